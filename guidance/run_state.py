"""Per-run state of the injectors, and the opt-in trace tests read.

Patch objects are shared by every clone of a model (current ComfyUI) or made to behave so (0.3.75): anything
an injector learns while sampling (keys/values of an identity, reference features of this step, a working
batch size, counters) must not outlive the run. The patching layer installs a SAMPLER_SAMPLE wrapper that
creates one ``RunState`` when sampling starts, hands it to every model call of the run through the
transformer options, and clears it in ``finally``. A model call outside any sampler run (a bench, the trainer,
a node calling the model directly) gets a state of its own that lives as long as that call.

Injectors keep nothing else between calls: ``RunState.of(injector)`` gives each its own namespace, made by
``injector.new_run_state()``.

Tracing is off unless a test (or a diagnostic script) opens ``Trace()``: while it is open, ``record(name,
**data)`` appends events, and every run state made meanwhile is listed too. Production code never keeps what
a trace would show.
"""
from __future__ import annotations

import contextvars
import itertools
from typing import Any, Optional

RUN_KEY = "idportrait_run"   # transformer_options: the RunState of this sampling run (or of this one call)

_active_trace: contextvars.ContextVar = contextvars.ContextVar("idportrait_trace", default=None)
_run_ids = itertools.count(1)


class RunState:
    """What the injectors of one sampling run know; ``clear()`` drops it all."""

    def __init__(self, scope: str = "run"):
        self.id = next(_run_ids)
        self.scope = scope             # "run" (a sampler run) or "call" (a model call outside any run)
        self._states: dict[int, tuple[Any, Any]] = {}
        self.cleared = False
        trace = _active_trace.get()
        if trace is not None:
            trace.runs.append(self)

    def of(self, injector) -> Any:
        """The state object of ``injector`` in this run (made on first use)."""
        if self.cleared:
            raise RuntimeError("this sampling run has ended: its state was cleared")
        entry = self._states.get(id(injector))
        if entry is None or entry[0] is not injector:
            entry = (injector, injector.new_run_state())
            self._states[id(injector)] = entry
        return entry[1]

    def clear(self) -> None:
        self._states.clear()
        self.cleared = True

    def __len__(self) -> int:
        return len(self._states)

    def __deepcopy__(self, memo):
        return self   # model options are deep-copied on 0.3.75; the run's state stays one object


def run_state_of(transformer_options: dict) -> RunState:
    """The run state a hook must use: the run's, else one for this call (stored in the call's options)."""
    state = transformer_options.get(RUN_KEY)
    if state is None:
        state = transformer_options[RUN_KEY] = RunState("call")
    return state


def tracing() -> bool:
    return _active_trace.get() is not None


def record(name: str, **data) -> None:
    """Append an event to the open trace; nothing when no trace is open."""
    trace = _active_trace.get()
    if trace is not None:
        trace.events.append((name, data))


class Trace:
    """``with Trace() as t: ...`` then ``t.count("flashface.reference_pass")``, ``t.of(name)``, ``t.runs``."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []
        self.runs: list[RunState] = []
        self._token: Optional[contextvars.Token] = None

    def __enter__(self) -> "Trace":
        self._token = _active_trace.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _active_trace.reset(self._token)

    def of(self, name: str) -> list[dict]:
        return [d for n, d in self.events if n == name]

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.events if n == name)

    def names(self) -> list[str]:
        return [n for n, _ in self.events]
