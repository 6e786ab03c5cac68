"""The backend registry: entry points in the ``normkit.backends`` group, loaded lazily, dispatched by
(op, direction, dtype) and an ordered list of backend names.

Loading happens in two steps so that ``import normkit`` and listing names stay cheap:

1. the entry point's object, a :class:`Backend` declaration, lives in a light module (no numba, no torch);
2. ``Backend.module`` is imported only when one of its kernels is first needed; it must define ``KERNELS``.

A plugin that fails at either step becomes a ``RuntimeWarning`` naming it and a failed row in
:func:`list_backends`; it never breaks the other backends.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
import types
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Mapping, Sequence

from .contract import (
    ADDRESS, ADDRESS_DTYPES, CHANNEL_OPS, CONTRACT_VERSION, DEFAULT_DTYPES, DIRECTIONS, DTYPES, LAYOUT_DTYPES,
    LAYOUTS, NCHW, NHWC, OPS, SPECS, plain_direction,
)

GROUP = "normkit.backends"
# Built-ins come first in this order, then plugins by name, then the reference as the backend of last resort.
# cython first: in `normkit bench --cases reference` (README, Performance) the two are within the machine's noise of
# each other (each faster in about half of the 16 cases, cython never slower than PyTorch's median), and cython
# needs no JIT compile on first use (numba: 3-10 s per op and dtype, once per machine).
BUILTIN_PREFERENCE = ("cython", "numba")
REFERENCE = "reference"


class UnknownBackendError(ValueError):
    """A backend name that is not installed (or was disabled)."""


@dataclass(frozen=True)
class Backend:
    """What a backend declares about itself. Cheap to import: it names its kernels module, never imports it.

    ``kernels`` maps each op to the directions implemented (see :mod:`normkit.contract`); ``dtypes`` applies to
    all of them. ``channels_last`` maps an op to the directions that also have a channels-last kernel (channel ops
    only, among the directions of ``kernels``), for the dtypes of ``dtypes`` that are in ``channels_last_dtypes``
    (float32 and float64 unless the backend names more). ``addresses`` maps an op to the directions that also have
    an address kernel (among the directions of ``kernels``; every dtype of ``dtypes``). ``module`` is the dotted
    name of the kernels module (or, for backends registered at run time, an object with a ``KERNELS`` attribute).
    """

    name: str
    module: str | object
    kernels: Mapping[str, Sequence[str]]
    dtypes: Sequence[str] = DEFAULT_DTYPES
    contract: int = CONTRACT_VERSION
    description: str = ""
    channels_last: Mapping[str, Sequence[str]] = field(default_factory=dict)
    channels_last_dtypes: Sequence[str] = LAYOUT_DTYPES
    addresses: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def declared(self) -> frozenset[tuple[str, str, str]]:
        """The NCHW kernels (and the row ops'): (op, direction, dtype) keys of ``KERNELS``."""
        return frozenset(
            (op, direction, dtype)
            for op, directions in self.kernels.items()
            for direction in directions
            for dtype in self.dtypes
        )

    def declared_channels_last(self) -> frozenset[tuple[str, str, str, str]]:
        """The channels-last kernels: (op, direction, dtype, "nhwc") keys of ``KERNELS``."""
        return frozenset(
            (op, direction, dtype, NHWC)
            for op, directions in self.channels_last.items()
            for direction in directions
            for dtype in self.dtypes
            if dtype in self.channels_last_dtypes
        )

    def declared_addresses(self) -> frozenset[tuple[str, str, str, str]]:
        """The address kernels: (op, direction, dtype, "addr") keys of ``KERNELS``."""
        return frozenset(
            (op, direction, dtype, ADDRESS)
            for op, directions in self.addresses.items()
            for direction in directions
            for dtype in self.dtypes
            if dtype in ADDRESS_DTYPES
        )

    def declared_all(self) -> frozenset[tuple[str, ...]]:
        """Every key of ``KERNELS`` the backend declares."""
        return self.declared() | self.declared_channels_last() | self.declared_addresses()

    def validate(self) -> None:
        """Raise ValueError (TypeError for a name that is no string) if the declaration itself is malformed or
        targets another contract."""
        if not isinstance(self.name, str):
            raise TypeError(f"Backend: name must be a str, got {self.name!r} ({type(self.name).__name__})")
        if not self.name or self.name != self.name.strip() or "," in self.name:
            raise ValueError(f"Backend: name must be non-empty, without a comma or surrounding spaces (as "
                             f"NORMKIT_BACKEND lists names), got {self.name!r}")
        if self.contract != CONTRACT_VERSION:
            raise ValueError(
                f"backend {self.name!r} targets kernel contract {self.contract}, "
                f"this normkit speaks contract {CONTRACT_VERSION}"
            )
        if isinstance(self.dtypes, str):
            raise ValueError(f"backend {self.name!r}: dtypes must be a sequence of dtype names, got the string "
                             f"{self.dtypes!r}")
        for op, directions in self.kernels.items():
            if isinstance(directions, str):
                raise ValueError(f"backend {self.name!r}: directions for {op} must be a sequence, got the string "
                                 f"{directions!r}")
            if op not in OPS:
                raise ValueError(f"backend {self.name!r} declares unknown op {op!r}; ops are {', '.join(OPS)}")
            bad = [d for d in directions if d not in DIRECTIONS[op]]
            if bad:
                raise ValueError(
                    f"backend {self.name!r} declares unknown direction(s) {bad} for {op}; "
                    f"valid: {', '.join(DIRECTIONS[op])}"
                )
        bad = [d for d in self.dtypes if d not in DTYPES]
        if bad:
            raise ValueError(f"backend {self.name!r} declares unsupported dtype(s) {bad}; valid: {', '.join(DTYPES)}")
        if isinstance(self.channels_last_dtypes, str):
            raise ValueError(f"backend {self.name!r}: channels_last_dtypes must be a sequence of dtype names, got the "
                             f"string {self.channels_last_dtypes!r}")
        bad = [d for d in self.channels_last_dtypes if d not in DTYPES]
        if bad:
            raise ValueError(f"backend {self.name!r} declares unsupported channels-last dtype(s) {bad}; valid: "
                             f"{', '.join(DTYPES)}")
        if self.channels_last and not set(self.channels_last_dtypes) & set(self.dtypes):
            raise ValueError(f"backend {self.name!r} declares channels-last kernels for none of its dtypes: "
                             f"channels_last_dtypes {tuple(self.channels_last_dtypes)}, dtypes {tuple(self.dtypes)} "
                             f"(channels-last kernels are for the dtypes in both)")
        for op, directions in self.channels_last.items():
            if isinstance(directions, str):
                raise ValueError(f"backend {self.name!r}: channels_last directions for {op} must be a sequence, got "
                                 f"the string {directions!r}")
            if op not in CHANNEL_OPS:
                raise ValueError(f"backend {self.name!r} declares channels-last kernels for {op!r}; only the channel "
                                 f"ops have a layout: {', '.join(CHANNEL_OPS)}")
            bad = [d for d in directions if d not in self.kernels.get(op, ())]
            if bad:
                raise ValueError(f"backend {self.name!r} declares channels-last {op} direction(s) {bad} without the "
                                 f"NCHW kernel; its {op} directions: {', '.join(self.kernels.get(op, ())) or 'none'}")
        for op, directions in self.addresses.items():
            bad = [d for d in directions if d not in self.kernels.get(op, ())] if not isinstance(directions, str) \
                else [directions]
            if bad:
                raise ValueError(f"backend {self.name!r} declares address kernels for {op} direction(s) {bad} without "
                                 f"the NCHW kernel (a sequence of its directions); its {op} directions: "
                                 f"{', '.join(self.kernels.get(op, ())) or 'none'}")


@dataclass
class _Entry:
    name: str
    package: str  # distribution that provides it ("" for run-time registrations)
    builtin: bool
    entry_point: metadata.EntryPoint | None = None
    spec: Backend | None = None
    kernels: dict | None = None
    info: dict = field(default_factory=dict)
    set_threads: Callable[[int], None] | None = None
    error: str | None = None


@dataclass(frozen=True)
class BackendInfo:
    """One row of :func:`list_backends`."""

    name: str
    package: str
    builtin: bool
    status: str  # "ok", "failed" or "not loaded"
    error: str | None
    implements: tuple[tuple[str, str, str], ...]
    info: Mapping[str, str]
    description: str
    channels_last: tuple[tuple[str, str, str, str], ...] = ()
    addresses: tuple[tuple[str, str, str, str], ...] = ()


_lock = threading.RLock()
_entries: dict[str, _Entry] | None = None
_user_order: tuple[str, ...] | None = None
_num_threads: int | None = None  # the user's choice (set_num_threads)
_followed_threads: int | None = None  # a framework's thread count, used while the user has made no choice
_thread_source: Callable[[], int] | None = None  # where that count comes from (follow_num_threads)
_source_threads = 0  # what _thread_source gave last
_fork_cap: int | None = None  # 1 in a process forked from one that had threads (see _after_fork_in_child)
_parent_threaded = False
_lookup_cache: dict = {}


_UNNAMED = "<unnamed package>"  # an installed entry point whose distribution's metadata has no Name


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    try:
        return (dist.metadata["Name"] or _UNNAMED) if dist is not None else _UNNAMED
    except Exception:  # malformed metadata must not break the scan (a missing Name raises on newer Pythons)
        return _UNNAMED


_FLAG_OFF = ("", "0", "false", "no", "off")
_FLAG_ON = ("1", "true", "yes", "on")


def _plugins_disabled(warn: bool = True) -> bool:
    """NORMKIT_DISABLE_PLUGINS read as a switch: 1 / true / yes / on disable plugins, unset, empty, 0 / false / no /
    off do not (any case); another value disables them too, with a warning that says how it was read (``warn``:
    the scan's reading; an error message that only mentions the variable reads it again without one)."""
    value = os.environ.get("NORMKIT_DISABLE_PLUGINS", "").strip().lower()
    if value in _FLAG_OFF:
        return False
    if warn and value not in _FLAG_ON:
        warnings.warn(f"normkit: NORMKIT_DISABLE_PLUGINS={os.environ['NORMKIT_DISABLE_PLUGINS']!r} is not one of "
                      f"{', '.join(_FLAG_ON)} or {', '.join(v for v in _FLAG_OFF if v)}; read as set: plugins are "
                      f"disabled", RuntimeWarning, stacklevel=2)
    return True


def _scan() -> dict[str, _Entry]:
    """Read entry point names and packages; imports nothing."""
    only_builtins = _plugins_disabled()
    entries: dict[str, _Entry] = {}
    for ep in metadata.entry_points(group=GROUP):
        package = _dist_name(ep)
        builtin = package.lower() == "normkit"
        if only_builtins and not builtin:
            continue
        new = _Entry(ep.name, package, builtin, ep)
        if ep.name in entries:
            kept = entries[ep.name]
            if (kept.package, kept.entry_point.value) == (package, ep.value):  # one distribution seen twice
                continue
            if builtin and not kept.builtin:  # a plugin may not shadow a built-in
                kept, new = new, kept
            entries[ep.name] = kept
            warnings.warn(
                f"normkit: backend name {ep.name!r} from package {new.package!r} is already taken by "
                f"{kept.package!r}; ignoring {new.package!r}'s",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        entries[ep.name] = new
    return entries


def _all() -> dict[str, _Entry]:
    global _entries
    with _lock:
        if _entries is None:
            _entries = _scan()
        return _entries


def refresh() -> None:
    """Forget everything loaded and scan the entry points again (after installing a plugin at run time)."""
    global _entries
    with _lock:
        _entries = None
        _lookup_cache.clear()


def _fail(entry: _Entry, stage: str, exc: BaseException | str) -> None:
    msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    entry.error = f"{stage}: {msg}"
    entry.kernels = None
    who = f"package {entry.package!r}" if entry.package else "registered at run time"
    if entry.entry_point is not None and entry.package == _UNNAMED:
        who = f"entry point {entry.name} = {entry.entry_point.value!r} of a package with no Name in its metadata"
    warnings.warn(f"normkit: backend {entry.name!r} ({who}) was skipped; {entry.error}", RuntimeWarning, stacklevel=4)


# what EntryPoint.load can take: a dotted module, then an attribute path (importlib.metadata's own pattern requires
# neither part to be non-empty, and a value like 'mod:' fails inside it with an AttributeError on None)
_ENTRY_POINT_VALUE = re.compile(r"\s*[\w.]+\s*(:\s*[\w.]+\s*)?(\[.*\])?\s*")


def _load_spec(entry: _Entry) -> Backend | None:
    if entry.spec is not None or entry.error is not None:
        return entry.spec
    try:
        if not _ENTRY_POINT_VALUE.fullmatch(entry.entry_point.value):
            raise ValueError(f"entry point {entry.name} = {entry.entry_point.value!r} is not "
                             f"'module:attribute' (for example 'mypackage.backend:backend')")
        spec = entry.entry_point.load()
        if not isinstance(spec, Backend):
            raise TypeError(f"entry point must name a normkit.Backend, got {type(spec).__name__}")
        if spec.name != entry.name:
            raise ValueError(f"entry point name {entry.name!r} differs from the declared name {spec.name!r}")
        spec.validate()
    except (Exception, SystemExit) as exc:  # a broken plugin must not break normkit (nor end the process)
        _fail(entry, "declaration", exc)
        return None
    entry.spec = spec
    return spec


def _load_kernels(entry: _Entry) -> dict | None:
    if entry.kernels is not None or entry.error is not None:
        return entry.kernels
    spec = _load_spec(entry)
    if spec is None:
        return None
    try:
        module = importlib.import_module(spec.module) if isinstance(spec.module, str) else spec.module
        kernels = dict(module.KERNELS)
        missing = sorted(spec.declared_all() - kernels.keys())
        if missing:
            raise LookupError(f"declares kernels it does not provide: {', '.join(map(':'.join, missing))}")
        not_callable = sorted(k for k in spec.declared_all() if not callable(kernels[k]))
        if not_callable:
            raise TypeError(f"kernels are not callable: {', '.join(map(':'.join, not_callable))}")
        entry.set_threads = getattr(module, "set_num_threads", None)
        entry.info = dict(getattr(module, "INFO", {}))
        threads = _wanted_threads()
        if threads is not None and entry.set_threads is not None:
            entry.set_threads(threads)
    except (Exception, SystemExit) as exc:
        _fail(entry, "kernels", exc)
        return None
    entry.kernels = kernels
    return kernels


def _entry(name: str, source: str = "") -> _Entry:
    """The installed backend ``name``; UnknownBackendError (its message prefixed with ``source``) otherwise."""
    with _lock:
        entries = _all()
        if name not in entries:
            raise UnknownBackendError(f"{source + ': ' if source else ''}unknown backend {name!r}{_disabled_hint()}; "
                                      f"installed backends: {', '.join(sorted(entries)) or 'none'}")
        return entries[name]


def _disabled_hint() -> str:
    return " (plugins are disabled by NORMKIT_DISABLE_PLUGINS)" if _plugins_disabled(warn=False) else ""


def require_backend(name, source: str) -> None:
    """Refuse, naming ``source``, a backend name that is no installed backend's: for callers that take a name now
    and look kernels up later (a layer's constructor, convert), so the mistake shows where it is made."""
    if not isinstance(name, str):
        raise TypeError(f"{source}: backend must be a str or None, got {type(name).__name__}")
    _entry(name, source)


def default_order() -> tuple[str, ...]:
    with _lock:
        entries = _all()
        builtins = [n for n in BUILTIN_PREFERENCE if n in entries]
        builtins += sorted(n for n, e in entries.items() if e.builtin and n not in builtins and n != REFERENCE)
        plugins = sorted(n for n, e in entries.items() if not e.builtin and n != REFERENCE)
        return tuple(builtins + plugins + ([REFERENCE] if REFERENCE in entries else []))


def _parse_order(names: Sequence[str], source: str) -> tuple[str, ...]:
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{source}: backend names must be strings, got {', '.join(map(repr, bad))}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{source}: backend(s) {', '.join(map(repr, repeated))} named more than once")
    entries = _all()
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise UnknownBackendError(
            f"{source} names unknown backend(s) {', '.join(map(repr, unknown))}{_disabled_hint()}; "
            f"installed backends: {', '.join(sorted(entries))}"
        )
    return tuple(names)


_env_warned = None  # the NORMKIT_BACKEND value (and installed backends) last warned about


def _env_order() -> tuple[str, ...]:
    """NORMKIT_BACKEND, minus names that are not installed: an environment variable left over from an
    uninstalled plugin (or naming a plugin that NORMKIT_DISABLE_PLUGINS hides) must not break every op."""
    global _env_warned
    raw = os.environ.get("NORMKIT_BACKEND", "")
    names = [n.strip() for n in raw.split(",") if n.strip()]
    entries = _all()
    unknown = [n for n in names if n not in entries]
    if unknown and (raw, tuple(entries)) != _env_warned:  # once per value (every lookup reads the order)
        _env_warned = (raw, tuple(entries))
        warnings.warn(
            f"normkit: NORMKIT_BACKEND names unknown backend(s) {', '.join(map(repr, unknown))}, ignored; "
            f"installed backends: {', '.join(sorted(entries))}",
            RuntimeWarning,
            stacklevel=4,
        )
    return tuple(dict.fromkeys(n for n in names if n in entries))


def get_backend_order() -> tuple[str, ...]:
    """The order in which backends are tried when no ``backend=`` is given.

    Names set with :func:`set_backend_order` (or, if none, the comma-separated ``NORMKIT_BACKEND`` environment
    variable; unknown names there are ignored with a RuntimeWarning) come first; every other installed backend
    follows in the default order.
    """
    with _lock:  # (the entries that register_backend / unregister_backend change under it)
        if _user_order is not None:
            # a name may have gone since it was set (unregister_backend, refresh)
            preferred = tuple(n for n in _user_order if n in _all())
        else:
            preferred = _env_order()
        return preferred + tuple(n for n in default_order() if n not in preferred)


def set_backend_order(names: Sequence[str] | None) -> None:
    """Prefer these backends, in this order (``None`` restores the default / ``NORMKIT_BACKEND``)."""
    global _user_order
    if isinstance(names, str):
        names = [names]
    with _lock:
        _user_order = None if names is None else _parse_order(list(names), "set_backend_order")
        _lookup_cache.clear()


# os.environ.get encodes the name and decodes the value on every call (~0.4 µs, half of a cached lookup); the
# mapping's own dict of encoded names and values, which os.environ[...] = ... updates, answers in a dict look-up.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("NORMKIT_BACKEND") if _ENV_DATA is not None else None


_ANY_ENV = object()  # a cached lookup that does not depend on NORMKIT_BACKEND


def _env_backend():
    """NORMKIT_BACKEND's raw value (None when unset), only to tell whether it changed since a lookup."""
    if _ENV_DATA is not None:
        return _ENV_DATA.get(_ENV_KEY)
    return os.environ.get("NORMKIT_BACKEND")


def lookup(op: str, direction: str, dtype: str, backend: str | None = None,
           layout: str = NCHW) -> tuple[str, Callable] | None:
    """Return ``(backend_name, kernel)`` for one (op, direction, dtype) and memory layout.

    Raises UnknownBackendError for a name that is not installed, TypeError when no backend has the dtype, and
    ValueError for an op or direction nobody implements, or when the named backend failed to load or does not
    implement the kernel. After the first call for a key this is one dict look-up (plus, when the order comes from
    ``NORMKIT_BACKEND``, a read of that variable): the cache is dropped whenever the order, the thread count or the
    registrations change.

    ``layout="nhwc"`` asks for a channels-last kernel (channel ops only) of the backend that runs the op's NCHW
    kernels (the named one, or the first in the order that has the op's plain direction), or **None** when it has
    none; the caller then runs the NCHW kernel (on the columns view, or on a copy), which raises the errors above.
    Never another backend's: a backend later in the order would run only the channels-last calls.
    """
    if _thread_source is not None and _thread_source() != _source_threads:  # (tens of ns)
        _follow_source()
    hit = _lookup_cache.get((op, direction, dtype, backend, layout))
    if hit is not None and (hit[1] is _ANY_ENV or hit[1] == _env_backend()):
        return hit[0]
    if type(dtype) is not str:  # a numpy dtype compares equal to its name but is another key, and errors named it
        raise TypeError(f"{op}: lookup takes the dtype's name (such as 'float32'), got {dtype!r} "
                        f"({type(dtype).__name__})")
    # resolved and cached under the lock that every change of the order, the threads or the registrations takes
    # to clear the cache: a lookup in another thread cannot cache what an order set meanwhile has replaced
    with _lock:
        env = _ANY_ENV if backend is not None or _user_order is not None else _env_backend()
        if layout == NCHW:
            result = _resolve(op, direction, dtype, backend)
        else:
            result = _resolve_layout(op, direction, dtype, backend, layout)
        _lookup_cache[(op, direction, dtype, backend, layout)] = (result, env)
    return result


def lookup_address(op: str, direction: str, dtype: str, backend: str | None = None,
                   layout: str = NCHW) -> Callable | None:
    """The address kernel (:mod:`normkit.contract`) of the backend that ``lookup(op, direction, dtype, backend)``
    picks, or None when that backend has none. Raises what :func:`lookup` raises; cached as it is.

    ``layout="nhwc"``: the address kernel to run on the (N*S, C, 1) columns view of channels-last data
    (:func:`normkit.contract.on_columns`: the same memory), or None: for a direction that is not per-channel, or
    when the backend has a channels-last kernel of its own for it (other than its NCHW kernel on that view, made
    by ``on_columns``): that kernel runs."""
    if _thread_source is not None and _thread_source() != _source_threads:  # as in lookup
        _follow_source()
    tail = ADDRESS if layout == NCHW else (ADDRESS, layout)
    hit = _lookup_cache.get((op, direction, dtype, backend, tail))
    if hit is not None and (hit[1] is _ANY_ENV or hit[1] == _env_backend()):
        return hit[0]
    with _lock:  # as in lookup
        name = lookup(op, direction, dtype, backend)[0]
        env = _ANY_ENV if backend is not None or _user_order is not None else _env_backend()
        key = (op, direction, dtype, ADDRESS)
        entry = _entry(name)
        spec = _load_spec(entry)
        kernels = _load_kernels(entry) if spec is not None and key in spec.declared_addresses() else None
        result = None if kernels is None else kernels[key]
        if layout != NCHW and result is not None:
            if not SPECS[op].per_channel(direction):
                result = None
            else:
                own = lookup(op, direction, dtype, name, layout)
                if own is not None and not hasattr(own[1], "on_columns_of"):
                    result = None
        _lookup_cache[(op, direction, dtype, backend, tail)] = (result, env)
    return result


def _resolve_layout(op: str, direction: str, dtype: str, backend: str | None,
                    layout: str) -> tuple[str, Callable] | None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; layouts are {', '.join(LAYOUTS)}")
    if op not in CHANNEL_OPS:
        raise ValueError(f"{op} has no channels-last kernels (only {', '.join(CHANNEL_OPS)} have a layout)")
    wanted = (op, direction, dtype, layout)
    with _lock:
        if backend is None:
            try:
                backend = _resolve(op, plain_direction(direction), dtype, None)[0]
            except (ValueError, TypeError):  # (the NCHW look-up the caller makes next names it)
                return None
        entry = _entry(backend)
        spec = _load_spec(entry)
        if spec is None or wanted not in spec.declared_channels_last():
            return None
        kernels = _load_kernels(entry)
        return None if kernels is None else (backend, kernels[wanted])


def _resolve(op: str, direction: str, dtype: str, backend: str | None) -> tuple[str, Callable]:
    if op not in DIRECTIONS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    if direction not in DIRECTIONS[op]:
        raise ValueError(f"{op} has no direction {direction!r}; it has {', '.join(DIRECTIONS[op])}")
    with _lock:
        order = (backend,) if backend is not None else get_backend_order()
        wanted = (op, direction, dtype)
        if backend is not None:
            entry = _entry(backend)
            spec = _load_spec(entry)
            if spec is not None and wanted not in spec.declared():
                declared_dtypes = sorted({d for o, dr, d in spec.declared() if (o, dr) == (op, direction)})
                if declared_dtypes:
                    raise TypeError(
                        f"{op}: backend {backend!r} has no {dtype} kernel for {direction}; "
                        f"it supports {', '.join(declared_dtypes)}"
                    )
                raise ValueError(f"{op}: backend {backend!r} does not implement {direction}")
            kernels = _load_kernels(entry)
            if kernels is None:
                raise ValueError(f"{op}: backend {backend!r} is unavailable; {entry.error}")
            result = (backend, kernels[wanted])
        else:
            result = None
            for name in order:
                entry = _all()[name]
                spec = _load_spec(entry)
                if spec is None or wanted not in spec.declared():
                    continue
                kernels = _load_kernels(entry)
                if kernels is not None:
                    result = (name, kernels[wanted])
                    break
            if result is None:
                dtypes = sorted({d for e in _all().values() if e.spec for o, dr, d in e.spec.declared()
                                 if (o, dr) == (op, direction)})
                if not dtypes:
                    raise ValueError(f"{op}: no installed backend implements {direction}")
                if dtype not in dtypes:
                    raise TypeError(f"{op}: no backend has a {dtype} kernel; supported dtypes: {', '.join(dtypes)}")
                raise ValueError(f"{op}: every backend implementing {direction} for {dtype} failed to load; "
                                 f"`normkit list` shows why")
        return result


def register_backend(spec: Backend, replace: bool = False) -> None:
    """Register a backend at run time (tests, notebooks). Taking a name that is already registered with a
    different declaration fails unless ``replace=True``."""
    if not isinstance(spec, Backend):
        raise TypeError(f"register_backend: expected a normkit.Backend, got {type(spec).__name__}")
    spec.validate()
    with _lock:
        entries = _all()
        old = entries.get(spec.name)
        if old is not None and not replace:
            if old.spec == spec:
                return
            raise ValueError(
                f"register_backend: backend name {spec.name!r} is taken (by "
                f"{old.package or 'a run-time registration'}); pass replace=True to replace it"
            )
        entries[spec.name] = _Entry(spec.name, "", False, spec=spec)
        _lookup_cache.clear()


def unregister_backend(name: str) -> None:
    """Remove a backend from this process's registry (entry points come back with :func:`refresh`)."""
    with _lock:
        _entry(name)
        del _all()[name]
        _lookup_cache.clear()


def list_backends(load: bool = True) -> list[BackendInfo]:
    """Every installed backend in dispatch order, what it implements and whether it loaded.

    ``load=True`` imports each backend's kernels module so that failures show up; ``load=False`` only reads the
    declarations.
    """
    rows = []
    with _lock:
        for name in get_backend_order():
            entry = _all()[name]
            spec = _load_spec(entry)
            if load and spec is not None:
                _load_kernels(entry)
            status = "failed" if entry.error else ("ok" if entry.kernels is not None else "not loaded")
            rows.append(
                BackendInfo(
                    name=name,
                    package=entry.package,
                    builtin=entry.builtin,
                    status=status,
                    error=entry.error,
                    implements=tuple(sorted(spec.declared())) if spec and not entry.error else (),
                    info=dict(entry.info),
                    description=spec.description if spec else "",
                    channels_last=tuple(sorted(spec.declared_channels_last())) if spec and not entry.error else (),
                    addresses=tuple(sorted(spec.declared_addresses())) if spec and not entry.error else (),
                )
            )
    return rows


def set_num_threads(n: int) -> None:
    """Threads used by every backend's kernels (default: all CPUs this process may use; once ``normkit.torch`` is
    imported, torch's ``torch.get_num_threads()``). A count set here holds until the next call."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: expected a positive int, got {n!r}")
    limit = os.cpu_count() or 1
    if n > limit:
        raise ValueError(f"set_num_threads: {n} threads requested, this machine has {limit} CPUs")
    with _lock:
        _num_threads = n
        _apply_threads(_wanted_threads())


def follow_num_threads(source: Callable[[], int]) -> None:
    """Take the kernels' thread count from a framework: ``source()`` (``normkit.torch`` passes
    ``torch.get_num_threads``), read at every kernel lookup and capped at the CPUs this process may use, while
    :func:`set_num_threads` has not been called. A process that runs torch on one thread (a DataLoader worker, one
    of several training processes) runs normkit's kernels on one thread too."""
    global _thread_source
    _thread_source = source
    _follow_source()


def _follow_source() -> None:
    """The lookups' check found the source's count changed (or it was just set): follow it."""
    global _followed_threads, _source_threads
    with _lock:
        _source_threads = n = _thread_source()
        _followed_threads = max(1, min(n, _cpus()))
        if _num_threads is None:
            _apply_threads(_wanted_threads())


def _apply_threads(n: int) -> None:
    """Give the loaded backends ``n`` threads (under _lock; the others get it when they load)."""
    _lookup_cache.clear()
    for entry in (_entries or {}).values():
        if entry.kernels is not None and entry.set_threads is not None:
            try:
                entry.set_threads(n)
            except Exception as exc:  # one backend's broken hook must not break the others
                _fail(entry, "set_num_threads", exc)
                _lookup_cache.clear()


def get_num_threads() -> int:
    if _thread_source is not None and _thread_source() != _source_threads:  # followed as it changes, as in lookup
        _follow_source()
    return _wanted_threads() or _cpus()


def _wanted_threads() -> int | None:
    """The thread count to give the backends, or None for their default (every CPU)."""
    n = _num_threads or _followed_threads
    return n if _fork_cap is None else min(n or _fork_cap, _fork_cap)


# GNU OpenMP cannot start a team of threads in a process forked from one whose OpenMP threads were running: the
# child waits forever for threads that fork did not copy (PyTorch's CPU ops hang there too, and share the runtime
# with normkit's Cython kernels). So a child forked from a process that had more than one thread runs the kernels
# on one thread, whatever it asks (the Numba backend takes numba's OpenMP layer over in the child, which would
# otherwise end it: normkit_kernels/numba/_common.py).
def _before_fork() -> None:
    global _parent_threaded
    try:
        _parent_threaded = len(os.listdir("/proc/self/task")) > 1
    except OSError:  # no /proc: assume threads
        _parent_threaded = True


def in_forked_child() -> bool:
    """Whether this process was forked from one that had threads running, so that the kernels run on one thread
    here (the Numba backend's OpenMP layer needs to know)."""
    return _fork_cap is not None


def _after_fork_in_child() -> None:
    global _fork_cap, _lock
    _lock = threading.RLock()  # another thread of the parent may have held it: it does not exist here
    if _parent_threaded:
        _fork_cap = 1
        _apply_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def runtime_module(kernels: Mapping[tuple[str, str, str], Callable], **attrs) -> types.SimpleNamespace:
    """A stand-in kernels module for :func:`register_backend` (``Backend(module=runtime_module({...}))``)."""
    return types.SimpleNamespace(KERNELS=dict(kernels), **attrs)
