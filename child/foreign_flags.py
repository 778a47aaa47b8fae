"""llama-server's flags that modelyard does not implement: recognised, so that a llama.cpp user's
command line and preset work unchanged (the router passes them to every child; the child says
once that each means nothing to it). A flag neither knows is still an error.

The table is child/llama_server_flags.py, generated from `llama-server --help`.
"""

from __future__ import annotations

from dataclasses import dataclass

from child.arguments import find_arg
from child.llama_server_flags import LLAMA_SERVER_FLAGS


class UnknownFlag(ValueError):
    pass


# llama-server flags about the server as a whole, never a model's: the router has its own (or
# lacks them, which is then said at startup); a preset section ignores them; and none may reach a
# child, where secrets would show in `ps`, /models and /running.
SERVER_LEVEL = frozenset({
    "host", "port", "api-key", "api-key-file", "ssl-key-file", "ssl-cert-file", "api-prefix", "path",
    "threads-http", "reuse-port", "version", "help", "hf-token", "timeout", "ui", "no-ui", "ui-config",
    "ui-config-file", "sleep-idle-seconds", "stop-idle-seconds", "cache-list", "completion-bash", "list-devices",
})


@dataclass(frozen=True)
class ForeignFlag:
    long: str  # the long name it is passed on as, without dashes: "cache-type-k", "no-slots"
    values: int  # how many values follow it

    @property
    def server_level(self) -> bool:
        return self.long in SERVER_LEVEL or self.long.startswith(("models-", "no-models-"))  # router mode's


def _negative(name: str, names: tuple[str, ...]) -> bool:
    """`--no-slots`, `-no-kvu`, and the short forms of a negative (`-nkvo`, `-nr`, `-nocb` beside
    `--no-kv-offload`, ...)."""
    bare = name.lstrip("-")
    if bare.startswith("no-"):
        return True
    has_negative = any(n.startswith("--no-") for n in names)
    return (has_negative and not name.startswith("--") and bare.startswith("n")
            and not names[0].lstrip("-").startswith("n"))


def _index() -> tuple[dict[str, ForeignFlag], dict[str, ForeignFlag]]:
    by_name: dict[str, ForeignFlag] = {}
    by_env: dict[str, ForeignFlag] = {}
    for names, values, env in LLAMA_SERVER_FLAGS:
        longs = [n[2:] for n in names if n.startswith("--")] or [names[-1].lstrip("-")]
        # A flag modelyard's child has under one of its spellings is passed on under the child's
        # own name (`--predict` is the child's `--n-predict`).
        own = next((spec.long for n in longs if (spec := find_arg(n)) is not None), None)
        positive = own or next((n for n in longs if not n.startswith("no-")), longs[0])
        negative = next((n for n in longs if n.startswith("no-")), positive)
        for name in names:
            by_name[name] = ForeignFlag(negative if _negative(name, names) else positive, values)
        if env:
            by_env[env] = ForeignFlag(positive, values)
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


# llama-server's flags that say where a model's file comes from on the Hugging Face Hub. In a
# preset section the router fetches the file itself before the load; they never reach a child.
HF_SOURCE_FLAGS = ("hf-repo", "hf-file")


def hf_source_key(key: str) -> str | None:
    """"hf-repo" or "hf-file" when a preset key is one of those flags under any of llama-server's
    spellings (`hf`, `hfr`, `hf-repo`, `hff`, `hf-file`, LLAMA_ARG_HF_REPO, ...), else None."""
    bare = key.strip().lstrip("-")
    flag = foreign_preset_key(bare) or _BY_NAME.get("-" + bare)
    return flag.long if flag is not None and flag.long in HF_SOURCE_FLAGS else None


def extract_foreign(argv: list[str], own: set[str], program: str
                    ) -> tuple[list[str], list[tuple[ForeignFlag, list[str]]]]:
    """(argv for argparse, llama-server's flags we do not have with their values). Taken out before
    argparse sees them: it would read `-ctk q8_0` as `-c tk` and a stray `q8_0`. Another spelling
    of one of our own flags is rewritten to ours (`--predict 7` -> `--n-predict 7`). UnknownFlag
    for a server-wide option `program` lacks (ignoring an --api-key would leave it open) and for
    a flag without its values."""
    rest: list[str] = []
    foreign: list[tuple[ForeignFlag, list[str]]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name, equals, attached = token.partition("=")
        flag = foreign_flag(name)
        if name in own or flag is None:
            rest.append(token)
            i += 1
            continue
        if attached:
            values = [attached]
        else:
            values = [] if equals else argv[i + 1: i + 1 + flag.values]
            if len(values) < flag.values or any(v.startswith("--") or foreign_flag(v) for v in values):
                raise UnknownFlag(f"{name} expects {flag.values} value(s)")
        i += 1 + (0 if equals else flag.values)
        if f"--{flag.long}" in own:
            rest += [f"--{flag.long}", *values]
        elif flag.server_level:
            raise UnknownFlag(f"--{flag.long} is a llama-server option {program} does not have")
        else:
            foreign.append((flag, values))
    return rest, foreign


def as_options(groups: list[tuple[ForeignFlag, list[str]]]) -> dict[str, str | bool]:
    """Flags as preset-style options (long name -> value, or True for a flag alone)."""
    return {flag.long: " ".join(values) if values else True for flag, values in groups}
