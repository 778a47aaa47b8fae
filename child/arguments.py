"""The child's command-line flags: one table, llama-server's names.

The router imports this table to validate preset keys (long name, short name or LLAMA_ARG_* name)
and to render a model's arguments; the child builds its argparse parser from it. Flags that
llama-server has but that mean nothing on this CPU-only engine (`ngl`, `mlock`, ...) are accepted
so that presets written for llama.cpp keep working; the child logs that it ignores them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class ArgSpec:
    long: str
    short: tuple[str, ...] = ()
    env: str = ""
    takes_value: bool = True
    effective: bool = True  # False: accepted for llama-server compatibility, no effect here
    default: object = None
    type: type = str
    help: str = ""
    aliases: tuple[str, ...] = ()  # other long names llama-server accepts for it
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.long.replace("-", "_")

    @property
    def names(self) -> list[str]:
        """Its command-line spellings: --long, its aliases, -short."""
        return [f"--{self.long}"] + [f"--{a}" for a in self.aliases] + [f"-{s}" for s in self.short]

    @property
    def env_name(self) -> str:
        return self.env or "LLAMA_ARG_" + self.long.upper().replace("-", "_")


CHILD_ARGS: tuple[ArgSpec, ...] = (
    ArgSpec("model", ("m",), "LLAMA_ARG_MODEL", help="path to the GGUF file"),
    ArgSpec("alias", ("a",), "LLAMA_ARG_ALIAS", help="model name(s) to report, comma separated"),
    ArgSpec("tags", (), "LLAMA_ARG_TAGS", help="free-form tags, comma separated (router listing only)"),
    ArgSpec("host", (), "LLAMA_ARG_HOST", default="127.0.0.1"),
    ArgSpec("port", (), "LLAMA_ARG_PORT", default=8080, type=int, help="0 picks a free port"),
    ArgSpec("ctx-size", ("c",), "LLAMA_ARG_CTX_SIZE", default=4096, type=int,
            help="total context of all slots in tokens; 0 = the model's training context"),
    ArgSpec("threads", ("t",), "LLAMA_ARG_THREADS", default=-1, type=int, help="-1 = number of cores"),
    ArgSpec("threads-batch", ("tb",), "LLAMA_ARG_THREADS_BATCH", default=-1, type=int),
    ArgSpec("batch-size", ("b",), "LLAMA_ARG_BATCH", default=512, type=int,
            help="most tokens in one decode call (chunked prefill)"),
    ArgSpec("ubatch-size", ("ub",), "LLAMA_ARG_UBATCH", default=512, type=int),
    ArgSpec("parallel", ("np",), "LLAMA_ARG_N_PARALLEL", default=4, type=int,
            help="slots: sequences decoded together"),
    ArgSpec("n-predict", ("n",), "LLAMA_ARG_N_PREDICT", default=-1, type=int,
            help="default max_tokens; -1 = until the slot's context is full"),
    ArgSpec("chat-template", (), "LLAMA_ARG_CHAT_TEMPLATE",
            help="built-in template name (chatml, gemma, llama3, zephyr) or a Jinja template"),
    ArgSpec("chat-template-file", (), "LLAMA_ARG_CHAT_TEMPLATE_FILE"),
    ArgSpec("jinja", (), "LLAMA_ARG_JINJA", takes_value=False, help="(always on here)"),
    ArgSpec("flash-attn", ("fa",), "LLAMA_ARG_FLASH_ATTN", default="auto", help="on, off or auto"),
    ArgSpec("seed", ("s",), "LLAMA_ARG_SEED", default=-1, type=int, help="default seed; -1 = random"),
    ArgSpec("temp", (), "LLAMA_ARG_TEMP", default=0.8, type=float),
    ArgSpec("top-k", (), "LLAMA_ARG_TOP_K", default=40, type=int),
    ArgSpec("top-p", (), "LLAMA_ARG_TOP_P", default=0.95, type=float),
    ArgSpec("min-p", (), "LLAMA_ARG_MIN_P", default=0.05, type=float),
    ArgSpec("repeat-penalty", (), "LLAMA_ARG_REPEAT_PENALTY", default=1.0, type=float),
    ArgSpec("repeat-last-n", (), "LLAMA_ARG_REPEAT_LAST_N", default=64, type=int),
    ArgSpec("sleep-idle-seconds", (), "LLAMA_ARG_SLEEP_IDLE_SECONDS", default=-1.0, type=float,
            help="free the model after this long without requests; -1 = never"),
    ArgSpec("batch-window-ms", (), "LLAMA_ARG_BATCH_WINDOW_MS", default=2.0, type=float,
            help="how long an idle engine waits for more requests to start together"),
    ArgSpec("max-queue", (), "LLAMA_ARG_MAX_QUEUE", default=256, type=int,
            help="requests waiting for a slot before 503"),
    ArgSpec("stream-buffer-bytes", (), "LLAMA_ARG_STREAM_BUFFER_BYTES", default=4 * 1024 * 1024, type=int,
            help="replay buffer of a resumable stream (X-Conversation-Id); oldest bytes dropped beyond it"),
    ArgSpec("stream-ttl-seconds", (), "LLAMA_ARG_STREAM_TTL_SECONDS", default=300.0, type=float,
            help="how long a finished resumable stream can still be replayed"),
    ArgSpec("embeddings", (), "LLAMA_ARG_EMBEDDINGS", takes_value=False, aliases=("embedding",),
            help="serve /v1/embeddings and /embedding (in a context of their own, beside generation)"),
    ArgSpec("pooling", (), "LLAMA_ARG_POOLING", choices=("none", "mean", "cls", "last", "rank"),
            help="how an input's token vectors make its embedding; default: the GGUF's, else mean"),
    ArgSpec("kv-unified", ("kvu",), "LLAMA_ARG_KV_UNIFIED", takes_value=False,
            help="one KV pool for all slots (greedy output then depends on the batch)"),
    ArgSpec("cont-batching", ("cb",), "LLAMA_ARG_CONT_BATCHING", takes_value=False, effective=False),
    ArgSpec("n-gpu-layers", ("ngl",), "LLAMA_ARG_N_GPU_LAYERS", effective=False),
    ArgSpec("mlock", (), "LLAMA_ARG_MLOCK", takes_value=False, effective=False),
    ArgSpec("no-mmap", (), "LLAMA_ARG_NO_MMAP", takes_value=False, effective=False),
    ArgSpec("mmproj", ("mm",), "LLAMA_ARG_MMPROJ", effective=False),
    ArgSpec("no-webui", (), "LLAMA_ARG_NO_WEBUI", takes_value=False, effective=False),
    ArgSpec("verbose", ("v",), "LLAMA_ARG_VERBOSE", takes_value=False),
)


def find_arg(key: str) -> ArgSpec | None:
    """The flag a preset key names: long name, short name or LLAMA_ARG_* name (dashes optional)."""
    bare = key.strip().lstrip("-")
    for spec in CHILD_ARGS:
        if bare in (spec.long, spec.long.replace("-", "_"), spec.env_name) or bare in spec.short \
                or bare in spec.aliases:
            return spec
    return None


def build_parser(prog: str = "modelyard-child") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve one GGUF model over an OpenAI-compatible HTTP API.", allow_abbrev=False,
    )
    for spec in CHILD_ARGS:
        help_text = spec.help + ("" if spec.effective else " (accepted for llama-server, no effect)")
        if spec.takes_value:
            parser.add_argument(*spec.names, dest=spec.dest, type=spec.type, default=spec.default,
                                choices=spec.choices, help=help_text)
        else:
            parser.add_argument(*spec.names, dest=spec.dest, action="store_true", help=help_text)
    return parser
