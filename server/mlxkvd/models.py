"""The resident model, chosen per request: at most one model in memory, switched on demand.

A request names a model: a catalogue name (``catalog.py``), a model directory, or nothing
for the resident one. ``ModelHost.use`` resolves the name and holds that model resident
while the turn is rendered (with its tokenizer) and submitted; a turn for another model
waits until no turn holds the resident one, then switches. A switch runs on the engine
thread once the turns submitted before it have ended (``Engine.switch_model``): the
resident model's caches go to the disk tier under its fingerprint, its weights leave memory,
and the new model is loaded, with its progress in ``state``. Switching back to a model finds
its conversations' caches on disk again. A load that fails loads the previous model back;
the requests that asked for it get the error, the others never notice.

A switch asked for while another is pending waits for it, then switches again if it still
needs to: two models requested in alternation take turns, each batch of requests for one
model running on that model's weights only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .catalog import Catalog, ModelEntry, describe
from .errors import ModelLoadError
from .runtime import ModelRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelState:
    """What GetStatus shows: "loaded", "unloaded", "switching" or "loading" (``name``, with
    the fraction of its weights read)."""

    state: str
    name: str
    progress: float = 1.0


@dataclass(frozen=True)
class Switched:
    entry: ModelEntry
    switch_s: float  # writing the previous model's caches and unloading it
    load_s: float
    loaded_now: bool  # False: it was resident already


class ModelHost:
    """The resident model of one daemon: its catalogue entry, and switching to another.

    ``load(entry, progress)`` makes a ``ModelRuntime`` for an entry (the daemon's settings:
    KV bits, a chat template override for the model it started with). ``context_caps`` maps
    model names to context windows below their own (``"*"``: every model's).
    """

    def __init__(self, engine, catalog: Catalog, entry: ModelEntry,
                 load: Callable[[ModelEntry, Callable[[float], None]], ModelRuntime],
                 context_caps: dict[str, int] | None = None):
        self.engine = engine
        self.catalog = catalog
        self.entry = entry
        self._load = load
        self.context_caps = dict(context_caps or {})
        self._cond = threading.Condition()
        self._holds = 0  # turns being rendered and submitted for the resident model
        self._switching: ModelEntry | None = None
        self._loading: ModelState | None = None

    @classmethod
    def for_engine(cls, engine, catalog: Catalog) -> "ModelHost":
        """A host whose resident model is the engine's runtime as it is, loading others with
        mlx-lm's defaults (in-process uses: tests, tools)."""
        runtime = engine.runtime
        entry = describe(runtime.model_dir, name=runtime.name, source="path")

        def load(entry: ModelEntry, progress: Callable[[float], None]) -> ModelRuntime:
            return ModelRuntime(entry.path, name=entry.name, progress=progress)

        return cls(engine, catalog, entry, load)

    # -- which model ---------------------------------------------------------------------

    def resolve(self, name: str) -> ModelEntry | None:
        """The entry a request's model names; None for "" (the resident model). Raises
        ``ModelNotFoundError`` or ``BadModelError`` (both name what was asked for)."""
        if not name:
            return None
        entry = self.entry
        if self._is_resident_name(entry, name):  # also a directory the catalogue does not list
            return entry
        return self.catalog.resolve(name)

    @staticmethod
    def _is_resident_name(entry: ModelEntry, name: str) -> bool:
        # A directory's own name too: what Status.model says of a model started with --model DIR.
        return name in (entry.name, str(entry.path), Path(entry.path).name) or Path(name).expanduser() == entry.path

    def _is_resident(self, entry: ModelEntry | None) -> bool:
        return entry is None or Path(entry.path).resolve() == Path(self.entry.path).resolve()

    @property
    def state(self) -> ModelState:
        loading = self._loading
        if loading is not None:
            return loading
        return ModelState("loaded" if self.engine.runtime.loaded else "unloaded", self.entry.name)

    def context_length(self, runtime: ModelRuntime, requested: int = 0) -> int:
        """The context window a turn gets: the model's, capped by the daemon's setting for it
        and by the request's own (0: none)."""
        caps = [runtime.context_length, requested or runtime.context_length]
        for key in (runtime.name, "*"):
            if self.context_caps.get(key):
                caps.append(self.context_caps[key])
                break
        return min(caps)

    # -- holding and switching -------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, name: str = "") -> Iterator[ModelRuntime]:
        """Hold the model ``name`` names resident while the block runs (render and submit a
        turn): a switch to another model waits for the block to end. Switches first if the
        model is not the resident one."""
        runtime, _ = self._hold(self.resolve(name))
        try:
            yield runtime
        finally:
            self._release()

    def switch(self, name: str) -> Switched:
        """Make ``name``'s model resident and loaded now (LoadModel)."""
        runtime, switched = self._hold(self.resolve(name))
        try:
            if switched is not None:
                return switched
            if runtime.loaded:
                return Switched(self.entry, 0.0, 0.0, False)
            started = time.monotonic()
            self.engine.call(runtime.ensure_loaded)  # after idle unload or UnloadModel
            return Switched(self.entry, 0.0, time.monotonic() - started, True)
        finally:
            self._release()

    def _hold(self, entry: ModelEntry | None) -> tuple[ModelRuntime, Switched | None]:
        """Wait until ``entry`` (None: whichever) is the resident model, switching to it if no
        one else is switching, and hold it. Returns the runtime and the switch this call made."""
        with self._cond:
            while True:
                if self._switching is None and self._is_resident(entry):
                    self._holds += 1
                    return self.engine.runtime, None
                if self._switching is None:
                    self._switching = entry  # this thread switches; new holds wait
                    break
                self._cond.wait()
            while self._holds:
                self._cond.wait()
        try:
            switched = self._switch(entry)
        except BaseException:
            with self._cond:
                self._switching, self._loading = None, None
                self._cond.notify_all()
            raise
        with self._cond:  # held before anyone else can switch again
            self._switching, self._loading = None, None
            self._holds += 1
            self._cond.notify_all()
            return self.engine.runtime, switched

    def _release(self) -> None:
        with self._cond:
            self._holds -= 1
            self._cond.notify_all()

    def _switch(self, entry: ModelEntry) -> Switched:
        old = self.entry
        log.info("switching models: %s -> %s (%s)", old.name, entry.name, entry.path)
        self._loading = ModelState("switching", entry.name, 0.0)
        started = time.monotonic()
        timings: dict[str, float] = {}

        def load() -> ModelRuntime:
            timings["switch"] = time.monotonic() - started
            self._loading = ModelState("loading", entry.name, 0.0)
            return self._load(entry, self._progress(entry.name))

        try:
            moved = self.engine.switch_model(load)
        except ModelLoadError as exc:
            log.error("model %s did not load, %s serves again: %s", entry.name, old.name, exc)
            raise
        self.entry = entry
        switch_s = timings.get("switch", 0.0)
        load_s = time.monotonic() - started - switch_s
        log.info("switched to %s in %.1f s (%d caches of %s moved to disk, %.1f s; load %.1f s)",
                 entry.name, switch_s + load_s, moved, old.name, switch_s, load_s)
        return Switched(entry, switch_s, load_s, True)

    def _progress(self, name: str) -> Callable[[float], None]:
        def report(fraction: float) -> None:
            self._loading = ModelState("loading", name, fraction)

        return report
