"""A model's status as the router sees it: the one state machine.

                load                 ready                 idle (sleep)
     unloaded ---------> loading ------------> loaded <-----------------> sleeping
        ^                  |                     |          wake
        |   exit / crash   |       unload        |
        +------------------+---------------------+   (exit_code kept; failed = exit_code != 0)
        ^   |
        |   |  download (POST /models names a new model: it is registered unloaded and starts
        |   v            downloading at once; or the first load of a preset model with `hf-repo`
    downloading          whose files are not in the cache yet)
                  (a model being fetched from the Hugging Face Hub; `finished` makes it unloaded,
                   and a preset model's load goes on to `loading` from there. A failed or
                   cancelled download makes a preset model unloaded again, and removes a model
                   POST /models added)

There is no failed state: a failure is `unloaded` with a non-zero exit code. `loading -> loading`
and `downloading -> downloading` are allowed to report progress. Registry.set_status is the only
place that changes a status.
"""

from __future__ import annotations

from enum import StrEnum


class ModelStatus(StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    SLEEPING = "sleeping"
    DOWNLOADING = "downloading"

    @property
    def is_running(self) -> bool:
        """A child process exists (it holds or is acquiring memory)."""
        return self in (ModelStatus.LOADING, ModelStatus.LOADED, ModelStatus.SLEEPING)

    @property
    def can_serve(self) -> bool:
        """Requests may be proxied (a sleeping child wakes itself on the request)."""
        return self in (ModelStatus.LOADED, ModelStatus.SLEEPING)


ALLOWED_TRANSITIONS: dict[ModelStatus, frozenset[ModelStatus]] = {
    ModelStatus.UNLOADED: frozenset({ModelStatus.LOADING, ModelStatus.DOWNLOADING}),
    ModelStatus.LOADING: frozenset({ModelStatus.LOADING, ModelStatus.LOADED, ModelStatus.UNLOADED}),
    ModelStatus.LOADED: frozenset({ModelStatus.SLEEPING, ModelStatus.UNLOADED}),
    ModelStatus.SLEEPING: frozenset({ModelStatus.LOADED, ModelStatus.UNLOADED}),
    ModelStatus.DOWNLOADING: frozenset({ModelStatus.DOWNLOADING, ModelStatus.UNLOADED}),
}


class InvalidTransition(RuntimeError):
    pass


def check_transition(old: ModelStatus, new: ModelStatus) -> None:
    if new not in ALLOWED_TRANSITIONS[old]:
        raise InvalidTransition(f"{old} -> {new} is not a valid model status change")
