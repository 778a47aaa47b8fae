"""What a re-read of the model sources changes: pure bookkeeping, applied by Registry.reload."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.errors import InvalidRequest
from router.model_record import ModelRecord
from router.model_sources import SOURCE_PEER, ModelSpec
from router.model_status import ModelStatus


@dataclass
class SourceDiff:
    removed: list[ModelRecord] = field(default_factory=list)
    changed: list[tuple[ModelRecord, ModelSpec]] = field(default_factory=list)
    added: list[ModelSpec] = field(default_factory=list)


def diff_sources(records: dict[str, ModelRecord], specs: list[ModelSpec]) -> SourceDiff:
    """Records whose model left the sources, records whose spec changed (with the new spec), and
    specs of new models. A download in progress and a peer's model are in no source of this
    router: neither is ever removed by a reload."""
    wanted = {spec.name: spec for spec in specs}
    diff = SourceDiff()
    for name, record in records.items():
        spec = wanted.pop(name, None)
        if spec is not None and record.spec.source == SOURCE_PEER:
            raise InvalidRequest(f"model '{name}' is a peer's model: give the section another name")
        if spec is None:
            if record.status != ModelStatus.DOWNLOADING and record.spec.source != SOURCE_PEER:
                diff.removed.append(record)
        elif spec != record.spec:
            diff.changed.append((record, spec))
    diff.added = list(wanted.values())
    return diff
