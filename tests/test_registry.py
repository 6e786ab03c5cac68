"""The backend registry: entry-point plugins (working and broken), dispatch, ordering, env vars, run-time
registration and its errors.

Fake plugins are real distributions as far as importlib.metadata is concerned: a module plus a
``<name>-0.1.dist-info`` directory (METADATA, entry_points.txt) in a temporary directory put on sys.path.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

import normkit
from normkit import Backend, UnknownBackendError, reference, registry
from normkit.registry import runtime_module

_serial = itertools.count()

KERNELS_MODULE = """\
from normkit import reference

CALLS = []

def _logged(key, fn):
    def kernel(*args):
        CALLS.append(key)
        fn(*args)
    return kernel

KERNELS = {{key: _logged(key, reference.KERNELS[key[:2] + ("float64",)]) for key in {provided!r}}}
{extra}
"""


class FakePlugins:
    """Writes fake plugin distributions into one directory on sys.path."""

    def __init__(self, root):
        self.root = root
        self.modules: list[str] = []

    def add(self, name, *, kernels=None, dtypes=("float64",), contract=1, provide=None, declaration_raises=False,
            kernels_raise=False, kernels_extra="", dist=None, entry_name=None, declaration=None, entry_value=None):
        """A plugin distribution whose ``normkit.backends`` entry point ``entry_name`` (default ``name``) names
        a Backend called ``name``. It provides the kernels in ``provide`` (default: everything it declares),
        each the reference kernel wrapped to log its calls in ``<kernels module>.CALLS``."""
        kernels = kernels or {"layernorm": ("forward", "backward")}
        tag = f"nkfake_{next(_serial)}_{os.getpid()}"
        decl_mod, kern_mod = f"{tag}_decl", f"{tag}_kernels"
        self.modules += [decl_mod, kern_mod]
        dist = dist or f"fake-{name}"
        if declaration is None:
            declaration = (
                "from normkit import Backend\n"
                + ("raise ImportError('fake plugin: no module named banana')\n" if declaration_raises else "")
                + f"backend = Backend(name={name!r}, module={kern_mod!r}, kernels={kernels!r}, dtypes={dtypes!r},"
                f" contract={contract})\n"
            )
        (self.root / f"{decl_mod}.py").write_text(declaration)
        if provide is None:
            provide = [(op, d, t) for op, ds in kernels.items() for d in ds for t in dtypes]
        source = KERNELS_MODULE.format(provided=list(provide), extra=kernels_extra)
        if kernels_raise:
            source = "raise RuntimeError('fake plugin: kernels exploded')\n" + source
        (self.root / f"{kern_mod}.py").write_text(source)
        info = self.root / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\n" + (f"Name: {dist}\n" if dist != "-" else "")
                                       + "Version: 0.1\n")  # (dist "-": no Name)
        value = entry_value or f"{decl_mod}:backend"
        (info / "entry_points.txt").write_text(f"[normkit.backends]\n{entry_name or name} = {value}\n")
        importlib.invalidate_caches()
        registry.refresh()
        return kern_mod


@pytest.fixture
def plugins(tmp_path):
    sys.path.insert(0, str(tmp_path))
    fake = FakePlugins(tmp_path)
    yield fake
    sys.path.remove(str(tmp_path))
    for mod in fake.modules:
        sys.modules.pop(mod, None)
    importlib.invalidate_caches()
    registry.refresh()


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    """Every test starts and ends with a freshly scanned registry and the default order."""
    monkeypatch.delenv("NORMKIT_BACKEND", raising=False)
    monkeypatch.delenv("NORMKIT_DISABLE_PLUGINS", raising=False)
    monkeypatch.setattr(registry, "_num_threads", None)
    monkeypatch.setattr(registry, "_followed_threads", None)  # (normkit.torch, in earlier tests, follows torch)
    monkeypatch.setattr(registry, "_thread_source", None)
    registry.set_backend_order(None)
    registry.refresh()
    yield
    registry.set_backend_order(None)
    registry.refresh()


def rows():
    return {row.name: row for row in normkit.list_backends(load=True)}


def ln_input():
    return np.random.default_rng(0).standard_normal((3, 8))


def run_subprocess(code: str, pythonpath=None, **env) -> str:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NORMKIT_")} | env
    if pythonpath:
        full_env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), full_env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# --- import weight ---------------------------------------------------------------------------------------------

def test_import_normkit_imports_neither_numba_nor_torch():
    out = run_subprocess("""
        import json, sys
        import normkit
        first = {m: m in sys.modules for m in ("numba", "torch")}
        normkit.list_backends(load=False)  # reads every declaration, plugins' included
        normkit.get("gn")
        print(json.dumps([first, {m: m in sys.modules for m in ("numba", "torch")}]))
    """)
    assert json.loads(out) == [{"numba": False, "torch": False}] * 2


# --- working plugin --------------------------------------------------------------------------------------------

def test_working_plugin_is_listed_and_dispatched(plugins):
    kern_mod = plugins.add("fakeok")
    row = rows()["fakeok"]
    assert (row.status, row.package, row.builtin, row.error) == ("ok", "fake-fakeok", False, None)
    assert ("layernorm", "forward", "float64") in row.implements
    x = ln_input()
    y = normkit.get("ln")(x, 8, backend="fakeok")
    expected = normkit.get("ln")(x, 8, backend="reference")
    np.testing.assert_array_equal(y, expected)
    assert sys.modules[kern_mod].CALLS == [("layernorm", "forward", "float64")]


def test_plugin_kernels_load_lazily(plugins):
    kern_mod = plugins.add("fakelazy")
    normkit.list_backends(load=False)
    assert kern_mod not in sys.modules
    registry.lookup("layernorm", "forward", "float64", backend="fakelazy")
    assert kern_mod in sys.modules


def test_default_order_builtins_then_plugins_then_reference(plugins):
    plugins.add("aaa_plugin")  # sorts before every built-in name, still comes after them
    order = normkit.get_backend_order()
    listed = {row.name: row for row in normkit.list_backends(load=False)}
    builtins = [n for n in order if listed[n].builtin and n != "reference"]
    assert order[-1] == "reference"
    assert order.index("aaa_plugin") > max(order.index(n) for n in builtins)
    assert [row.name for row in normkit.list_backends(load=False)] == list(order)


def test_dispatch_sends_a_plugin_only_what_it_declared(plugins):
    kern_mod = plugins.add("fakefirst", kernels={"layernorm": ("forward",)}, dtypes=("float64",))
    normkit.set_backend_order(["fakefirst", "reference"])  # the reference takes the rest: no JIT, no torch
    x = ln_input()
    y, saved = normkit.get("ln").forward(x, 8)
    assert saved.backend == "fakefirst"
    _, saved32 = normkit.get("ln").forward(x.astype(np.float32), 8)  # no float32 declared
    assert saved32.backend != "fakefirst"
    normkit.get("ln").backward(np.ones_like(x), x, saved, 8)  # no backward declared
    normkit.get("gn")(np.ones((2, 4, 3)), 2)  # no groupnorm declared
    assert sys.modules[kern_mod].CALLS == [("layernorm", "forward", "float64")]


def test_refresh_picks_up_a_plugin_installed_at_run_time(tmp_path):
    assert "fakelate" not in normkit.get_backend_order()
    sys.path.insert(0, str(tmp_path))
    try:
        fake = FakePlugins(tmp_path)
        fake.add("fakelate")  # calls refresh()
        assert "fakelate" in normkit.get_backend_order()
    finally:
        sys.path.remove(str(tmp_path))
        for mod in fake.modules:
            sys.modules.pop(mod, None)
        importlib.invalidate_caches()
    registry.refresh()
    assert "fakelate" not in normkit.get_backend_order()


# --- broken plugins --------------------------------------------------------------------------------------------

def assert_skipped(name, message_part):
    """The broken plugin warns naming itself, shows as failed, and the rest keeps working."""
    with pytest.warns(RuntimeWarning, match=f"backend '{name}'.*skipped") as caught:
        listing = rows()
    assert any(message_part in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert listing[name].status == "failed"
    assert message_part in listing[name].error
    assert listing[name].implements == ()
    assert listing["reference"].status == "ok"
    # dispatch falls past it, even when it is preferred
    normkit.set_backend_order([name])
    x = ln_input()
    y, saved = normkit.get("ln").forward(x, 8)
    assert saved.backend != name
    with pytest.raises(ValueError, match=f"backend '{name}' is unavailable"):
        normkit.get("ln")(x, 8, backend=name)


def test_plugin_raising_on_import_is_skipped(plugins):
    plugins.add("fakeboom", declaration_raises=True)
    assert_skipped("fakeboom", "no module named banana")


def test_plugin_whose_kernels_module_raises_is_skipped(plugins):
    plugins.add("fakekboom", kernels_raise=True)
    assert_skipped("fakekboom", "kernels exploded")


def test_plugin_exiting_at_import_is_skipped(plugins):
    """sys.exit() in a plugin's module (one that bails out on a CPU without some feature) skips the plugin; it
    does not end the process."""
    plugins.add("fakeexit", declaration="import sys\nsys.exit(3)\n")
    assert_skipped("fakeexit", "declaration: SystemExit: 3")


def test_plugin_whose_kernels_module_exits_is_skipped(plugins):
    plugins.add("fakekexit", kernels_extra="import sys\nsys.exit('no AVX2 here')\n")
    assert_skipped("fakekexit", "kernels: SystemExit: no AVX2 here")


def test_malformed_entry_point_value_is_named(plugins):
    plugins.add("fakebadep", entry_value="nkfake_module:")
    assert_skipped("fakebadep", "entry point fakebadep = 'nkfake_module:' is not 'module:attribute'")


def test_plugin_of_a_package_without_a_name_is_not_called_a_run_time_registration(plugins):
    kern = plugins.add("fakenoname", dist="-", kernels_raise=True)
    decl = kern.replace("_kernels", "_decl")
    with pytest.warns(RuntimeWarning, match=f"backend 'fakenoname' \\(entry point fakenoname = '{decl}:backend' of a "
                                            "package with no Name in its metadata\\) was skipped"):
        listing = rows()
    assert listing["fakenoname"].package == "<unnamed package>"
    assert "run time" not in listing["fakenoname"].error


def test_plugin_with_another_contract_version_is_skipped(plugins):
    plugins.add("fakefuture", contract=99)
    assert_skipped("fakefuture", "targets kernel contract 99")


def test_plugin_declaring_kernels_it_does_not_provide_is_skipped(plugins):
    plugins.add("fakeliar", kernels={"layernorm": ("forward", "backward")}, dtypes=("float32", "float64"),
                provide=[("layernorm", "forward", "float64"), ("layernorm", "backward", "float64")])
    assert_skipped("fakeliar", "declares kernels it does not provide: layernorm:backward:float32, "
                               "layernorm:forward:float32")


def test_plugin_declaring_an_unknown_op_is_skipped(plugins):
    plugins.add("fakeop", kernels={"pixelnorm": ("forward",), "layernorm": ("forward",)})
    assert_skipped("fakeop", "unknown op 'pixelnorm'")


def test_entry_point_naming_something_else_is_skipped(plugins):
    plugins.add("fakething", declaration="backend = object()\n")
    assert_skipped("fakething", "must name a normkit.Backend, got object")


def test_entry_point_name_must_match_the_declaration(plugins):
    plugins.add("fakeinner", entry_name="fakeouter")
    assert_skipped("fakeouter", "differs from the declared name 'fakeinner'")


def test_plugin_cannot_take_a_builtin_name(plugins):
    plugins.add("reference", dist="evil-reference")
    with pytest.warns(RuntimeWarning, match="'reference' from package 'evil-reference' is already taken"):
        listing = rows()
    assert listing["reference"].package == "normkit"


def test_broken_set_num_threads_hook_disables_only_that_backend(plugins):
    plugins.add("fakethreads", kernels_extra="def set_num_threads(n):\n    raise OSError('no threads here')\n")
    registry.lookup("layernorm", "forward", "float64", backend="fakethreads")
    with pytest.warns(RuntimeWarning, match="fakethreads.*no threads here"):
        normkit.set_num_threads(1)
    assert rows()["fakethreads"].status == "failed"
    assert normkit.get_num_threads() == 1
    assert normkit.get("ln")(ln_input(), 8).shape == (3, 8)


def test_set_num_threads_reaches_backends_loaded_later(plugins):
    kern_mod = plugins.add("fakethreads2",
                           kernels_extra="THREADS = []\ndef set_num_threads(n):\n    THREADS.append(n)\n")
    normkit.set_num_threads(1)
    registry.lookup("layernorm", "forward", "float64", backend="fakethreads2")
    assert sys.modules[kern_mod].THREADS == [1]


def test_broken_plugin_cannot_break_import_normkit(plugins):
    plugins.add("fakeboom2", declaration_raises=True)
    plugins.add("fakefuture2", contract=2)
    out = run_subprocess("""
        import warnings
        import numpy as np
        import normkit
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            status = {row.name: row.status for row in normkit.list_backends(load=False)}
        y = normkit.get("ln")(np.ones((2, 3)), 3)
        print(status["fakeboom2"], status["fakefuture2"], status["reference"], y.shape,
              sum("fakeboom2" in str(w.message) for w in caught), sep=";")
    """, pythonpath=plugins.root, NORMKIT_BACKEND="fakeboom2,fakefuture2,reference")
    assert out.strip() == "failed;failed;not loaded;(2, 3);1"


def test_backend_order_while_another_thread_registers():
    """get_backend_order read the registry's entries without its lock, so another thread's register_backend /
    unregister_backend made it raise 'dictionary changed size during iteration' (within a second at this switch
    interval, before the lock)."""
    specs = [Backend(f"rt_race{i}", runtime_module({}), kernels={}) for i in range(400)]
    stop, errors = threading.Event(), []

    def mutate():
        while not stop.is_set():
            for spec in specs:
                normkit.register_backend(spec)
            for spec in specs:
                normkit.unregister_backend(spec.name)

    def read():
        while not stop.is_set() and not errors:
            try:
                normkit.get_backend_order()
            except Exception as exc:  # noqa: BLE001 - any error is the finding
                errors.append(repr(exc))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=mutate), threading.Thread(target=read)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(interval)
        for spec in specs:
            if spec.name in normkit.get_backend_order():
                normkit.unregister_backend(spec.name)
    assert not errors, errors[0]


# --- environment variables -------------------------------------------------------------------------------------

def test_disable_plugins_loads_builtins_only(plugins, monkeypatch):
    plugins.add("fakehidden")
    assert "fakehidden" in normkit.get_backend_order()
    monkeypatch.setenv("NORMKIT_DISABLE_PLUGINS", "1")
    registry.refresh()
    assert all(row.builtin for row in normkit.list_backends(load=False))
    with pytest.raises(UnknownBackendError, match="disabled by NORMKIT_DISABLE_PLUGINS"):
        normkit.get("ln")(ln_input(), 8, backend="fakehidden")
    with pytest.raises(UnknownBackendError, match=r"'fakehidden' \(plugins are disabled by NORMKIT_DISABLE_PLUGINS"):
        normkit.set_backend_order(["fakehidden", "reference"])
    monkeypatch.setenv("NORMKIT_DISABLE_PLUGINS", "0")
    registry.refresh()
    assert "fakehidden" in normkit.get_backend_order()


def test_disable_plugins_is_read_as_a_switch(plugins, monkeypatch):
    plugins.add("fakeswitch")
    for value, disabled in (("false", False), ("No", False), (" off ", False), ("0", False), ("", False),
                            ("true", True), ("YES", True), ("on", True)):
        monkeypatch.setenv("NORMKIT_DISABLE_PLUGINS", value)
        registry.refresh()
        assert ("fakeswitch" not in normkit.get_backend_order()) is disabled, value
    monkeypatch.setenv("NORMKIT_DISABLE_PLUGINS", "maybe")
    registry.refresh()
    with pytest.warns(RuntimeWarning, match="NORMKIT_DISABLE_PLUGINS='maybe' is not one of 1, true, yes, on or 0, "
                                            "false, no, off; read as set: plugins are disabled"):
        assert "fakeswitch" not in normkit.get_backend_order()
    with warnings.catch_warnings():  # warned once, by the scan: the error's hint reads it without a warning
        warnings.simplefilter("error")
        with pytest.raises(UnknownBackendError, match="disabled by NORMKIT_DISABLE_PLUGINS"):
            normkit.get("ln")(ln_input(), 8, backend="fakeswitch")


def test_disable_plugins_in_a_fresh_process(plugins):
    plugins.add("fakehidden2")
    out = run_subprocess("import normkit; print(','.join(normkit.get_backend_order()))",
                         pythonpath=plugins.root, NORMKIT_DISABLE_PLUGINS="1")
    assert "fakehidden2" not in out and "reference" in out
    out = run_subprocess("import normkit; print(','.join(normkit.get_backend_order()))", pythonpath=plugins.root)
    assert "fakehidden2" in out


def test_normkit_backend_env_var_sets_the_preferred_order(monkeypatch):
    monkeypatch.setenv("NORMKIT_BACKEND", "reference")
    assert normkit.get_backend_order()[0] == "reference"
    _, saved = normkit.get("gn").forward(np.ones((2, 4, 3)), 2)
    assert saved.backend == "reference"
    # set_backend_order wins over the environment; None hands control back to it
    normkit.set_backend_order([b for b in normkit.get_backend_order() if b != "reference"][:1])
    assert normkit.get_backend_order()[0] != "reference"
    normkit.set_backend_order(None)
    assert normkit.get_backend_order()[0] == "reference"


def test_normkit_backend_env_var_with_unknown_names_warns_and_is_ignored(monkeypatch):
    monkeypatch.setenv("NORMKIT_BACKEND", " nosuch , reference")
    with pytest.warns(RuntimeWarning, match="NORMKIT_BACKEND names unknown backend.*'nosuch'.*installed backends: "):
        order = normkit.get_backend_order()
    assert order[0] == "reference" and "nosuch" not in order


def test_normkit_backend_env_var_warns_once_per_value(monkeypatch, recwarn):
    """Every lookup reads the order: one warning for a value, not one per call site."""
    monkeypatch.setenv("NORMKIT_BACKEND", "nosuch_once,reference")
    x = np.ones((2, 4, 3), np.float32)
    for _ in range(3):
        normkit.get_backend_order()
        normkit.get("ln")(x, (3,))
        normkit.get("gn")(x, 2)
    assert [str(w.message).count("nosuch_once") for w in recwarn.list] == [1]
    monkeypatch.setenv("NORMKIT_BACKEND", "nosuch_twice,reference")
    with pytest.warns(RuntimeWarning, match="nosuch_twice"):
        normkit.get_backend_order()


def test_normkit_backend_env_var_in_a_fresh_process():
    out = run_subprocess("""
        import numpy as np, normkit
        print(normkit.get("bn").forward(np.ones((4, 3)), training=True)[1].backend)
    """, NORMKIT_BACKEND="reference")
    assert out.strip() == "reference"


# --- set_backend_order -----------------------------------------------------------------------------------------

def test_set_backend_order_puts_names_first_and_keeps_the_rest():
    default = normkit.get_backend_order()
    normkit.set_backend_order("reference")
    assert normkit.get_backend_order() == ("reference",) + tuple(n for n in default if n != "reference")
    normkit.set_backend_order(None)
    assert normkit.get_backend_order() == default


def test_set_backend_order_errors():
    before = normkit.get_backend_order()
    with pytest.raises(UnknownBackendError, match=r"names unknown backend\(s\) 'nosuch'; installed backends: .*"
                                                  r"reference"):
        normkit.set_backend_order(["reference", "nosuch"])
    with pytest.raises(ValueError, match="'reference' named more than once"):
        normkit.set_backend_order(["reference", "reference"])
    with pytest.raises(TypeError, match="backend names must be strings, got 3"):
        normkit.set_backend_order(["reference", 3])
    assert normkit.get_backend_order() == before  # a failed call changes nothing


def test_order_survives_unregistering_a_preferred_backend():
    normkit.register_backend(Backend("tmpfirst", runtime_module({}), kernels={}))
    normkit.set_backend_order(["tmpfirst", "reference"])
    normkit.unregister_backend("tmpfirst")
    assert normkit.get_backend_order()[0] == "reference"
    assert normkit.get("ln").forward(ln_input(), 8)[1].backend == "reference"


# --- lookup errors ---------------------------------------------------------------------------------------------

def test_unknown_backend_error_lists_installed_backends():
    with pytest.raises(UnknownBackendError) as info:
        normkit.get("gn")(np.ones((2, 4, 3)), 2, backend="nosuch")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "unknown backend 'nosuch'" in message
    for name in normkit.get_backend_order():
        assert name in message


def test_lookup_errors_for_dtype_and_direction():
    kernels = {("layernorm", "forward", "float64"): reference.layernorm_forward}
    normkit.register_backend(Backend("only64", runtime_module(kernels), kernels={"layernorm": ("forward",)},
                                     dtypes=("float64",)))
    with pytest.raises(TypeError, match="layernorm: backend 'only64' has no float32 kernel for forward; "
                                        "it supports float64"):
        normkit.get("ln")(ln_input().astype(np.float32), 8, backend="only64")
    x = ln_input()
    y, saved = normkit.get("ln").forward(x, 8, backend="only64")
    with pytest.raises(ValueError, match="layernorm: backend 'only64' does not implement backward"):
        normkit.get("ln").backward(np.ones_like(x), x, saved, 8, backend="only64")
    with pytest.raises(ValueError, match="groupnorm: backend 'only64' does not implement forward"):
        normkit.get("gn")(np.ones((2, 4, 3)), 2, backend="only64")


def test_lookup_takes_dtype_names_and_says_so():
    """A NumPy dtype equals its name but is another cache key; it used to fail with 'no float32 kernel ... it
    supports ..., float32'."""
    with pytest.raises(TypeError, match=r"layernorm: lookup takes the dtype's name \(such as 'float32'\), got "
                                        r"dtype\('float32'\)"):
        registry.lookup("layernorm", "forward", np.dtype("float32"), "cython")
    assert registry.lookup("layernorm", "forward", "float32", "cython")[0] == "cython"


def test_lookup_error_when_no_backend_has_the_dtype(monkeypatch):
    monkeypatch.setenv("NORMKIT_DISABLE_PLUGINS", "1")
    registry.refresh()
    for name in [row.name for row in normkit.list_backends(load=False)]:
        normkit.unregister_backend(name)
    normkit.register_backend(Backend("only64", runtime_module({("layernorm", "forward", "float64"):
                                                               reference.layernorm_forward}),
                                     kernels={"layernorm": ("forward",)}, dtypes=("float64",)))
    with pytest.raises(TypeError, match="layernorm: no backend has a float32 kernel; supported dtypes: float64"):
        registry.lookup("layernorm", "forward", "float32")
    with pytest.raises(ValueError, match="layernorm: no installed backend implements backward"):
        registry.lookup("layernorm", "backward", "float64")
    normkit.register_backend(Backend("broken64", runtime_module({}), kernels={"groupnorm": ("forward",)},
                                     dtypes=("float64",)))
    with pytest.warns(RuntimeWarning, match="broken64"):
        with pytest.raises(ValueError, match="groupnorm: every backend implementing forward for float64 failed to "
                                             "load; `normkit list` shows why"):
            registry.lookup("groupnorm", "forward", "float64")


def test_lookup_refuses_an_op_or_direction_not_in_the_table():
    """An op or direction nobody has is a clear error, never some other op's kernel."""
    with pytest.raises(ValueError,
                       match="unknown op 'pixelnorm'; ops are batchnorm, layernorm, instancenorm, groupnorm, rmsnorm"):
        registry.lookup("pixelnorm", "forward", "float32")
    with pytest.raises(ValueError, match="groupnorm has no direction 'forward_infer'; it has forward, backward"):
        registry.lookup("groupnorm", "forward_infer", "float32")


def test_builtin_backends_declare_exactly_what_they_implement():
    """A built-in declares its ops, directions and dtypes itself, not the contract's: a new op or dtype in the
    table must not make it claim (and fail to load for) kernels it does not have."""
    for row in normkit.list_backends(load=True):
        if row.builtin:
            assert row.status == "ok", row
            module = importlib.import_module(registry._all()[row.name].spec.module)
            assert set(row.implements) | set(row.channels_last) | set(row.addresses) == set(module.KERNELS), \
                row.name


def test_lookup_cache_follows_the_order_and_registrations(monkeypatch):
    monkeypatch.delenv("NORMKIT_BACKEND", raising=False)
    first = registry.lookup("layernorm", "forward", "float64")[0]
    assert registry.lookup("layernorm", "forward", "float64")[0] == first
    monkeypatch.setenv("NORMKIT_BACKEND", "reference")
    assert registry.lookup("layernorm", "forward", "float64")[0] == "reference"
    monkeypatch.delenv("NORMKIT_BACKEND")
    kernels = {("layernorm", "forward", "float64"): reference.layernorm_forward}
    normkit.register_backend(Backend("cached", runtime_module(kernels), kernels={"layernorm": ("forward",)},
                                     dtypes=("float64",)))
    try:
        normkit.set_backend_order(["cached"])
        assert registry.lookup("layernorm", "forward", "float64")[0] == "cached"
        normkit.unregister_backend("cached")
        assert registry.lookup("layernorm", "forward", "float64")[0] == first
    finally:
        normkit.set_backend_order(None)
        if "cached" in {b.name for b in normkit.list_backends(load=False)}:
            normkit.unregister_backend("cached")


def test_an_order_set_during_a_lookup_in_another_thread_is_not_lost(monkeypatch):
    """A lookup resolves and caches under the registry's lock, which set_backend_order takes to clear the cache: an
    order set by another thread while a lookup resolves applies to every lookup after it (the lookup's result was
    cached after the resolution, outside the lock, so the old order's backend came back until the next change)."""
    import threading

    monkeypatch.delenv("NORMKIT_BACKEND", raising=False)
    resolve = registry._resolve
    setter = threading.Thread(target=normkit.set_backend_order, args=(["reference"],))

    def resolve_while_another_thread_sets_the_order(*args):
        result = resolve(*args)
        setter.start()
        setter.join(0.5)  # it waits for the lock (it ran to the end before the fix)
        return result

    normkit.set_backend_order(["cython"])
    try:
        monkeypatch.setattr(registry, "_resolve", resolve_while_another_thread_sets_the_order)
        assert registry.lookup("layernorm", "forward", "float64")[0] == "cython"
        setter.join()
        monkeypatch.setattr(registry, "_resolve", resolve)
        assert registry.lookup("layernorm", "forward", "float64")[0] == "reference"
    finally:
        normkit.set_backend_order(None)


# --- run-time registration -------------------------------------------------------------------------------------

def test_register_backend_dispatches_and_unregisters():
    normkit.register_backend(Backend("rt", runtime_module(reference.KERNELS), kernels=reference.backend.kernels))
    assert rows()["rt"].package == ""
    x = ln_input()
    np.testing.assert_array_equal(normkit.get("ln")(x, 8, backend="rt"), normkit.get("ln")(x, 8, backend="reference"))
    normkit.unregister_backend("rt")
    with pytest.raises(UnknownBackendError, match="unknown backend 'rt'"):
        normkit.get("ln")(x, 8, backend="rt")
    with pytest.raises(UnknownBackendError):
        normkit.unregister_backend("rt")


def test_register_backend_refuses_a_taken_name_unless_replace():
    spec = Backend("rt2", runtime_module(reference.KERNELS), kernels={"layernorm": ("forward",)})
    normkit.register_backend(spec)
    normkit.register_backend(spec)  # the same declaration again is harmless
    other = Backend("rt2", runtime_module(reference.KERNELS), kernels={"groupnorm": ("forward",)})
    with pytest.raises(ValueError, match="backend name 'rt2' is taken .*pass replace=True"):
        normkit.register_backend(other)
    normkit.register_backend(other, replace=True)
    assert ("groupnorm", "forward", "float64") in rows()["rt2"].implements
    with pytest.raises(ValueError, match="backend name 'reference' is taken \\(by normkit\\)"):
        normkit.register_backend(Backend("reference", runtime_module({}), kernels={}))


@pytest.mark.parametrize("kwargs, message", [
    ({"kernels": {"pixelnorm": ("forward",)}}, "unknown op 'pixelnorm'"),
    ({"kernels": {"groupnorm": ("forward_infer",)}}, r"unknown direction\(s\) \['forward_infer'\] for groupnorm"),
    ({"kernels": {}, "dtypes": ("float8",)}, r"unsupported dtype\(s\) \['float8'\]"),
    ({"kernels": {}, "contract": 0}, "targets kernel contract 0, this normkit speaks contract 1"),
    ({"kernels": {"layernorm": "forward"}}, "directions for layernorm must be a sequence, got the string 'forward'"),
    ({"kernels": {}, "dtypes": "float32"}, "dtypes must be a sequence of dtype names, got the string 'float32'"),
])
def test_register_backend_validates_the_declaration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        normkit.register_backend(Backend("bad", runtime_module({}), **kwargs))
    assert "bad" not in normkit.get_backend_order()


@pytest.mark.parametrize("name, error, message", [
    (7, TypeError, "Backend: name must be a str, got 7 \\(int\\)"),
    ("", ValueError, "name must be non-empty, without a comma or surrounding spaces .* got ''"),
    ("a,b", ValueError, "got 'a,b'"),
    (" sp ", ValueError, "got ' sp '"),
])
def test_register_backend_refuses_a_name_normkit_backend_cannot_list(name, error, message):
    """A name that is no string broke every later dispatch (sorting the names); one with a comma or spaces could
    never be named in NORMKIT_BACKEND."""
    with pytest.raises(error, match=message):
        normkit.register_backend(Backend(name, runtime_module({}), kernels={}))
    y, saved = normkit.get("ln").forward(ln_input(), 8)
    assert saved.backend in normkit.get_backend_order()


def test_register_backend_needs_a_backend():
    with pytest.raises(TypeError, match="expected a normkit.Backend, got dict"):
        normkit.register_backend({"name": "x"})


def test_runtime_backend_missing_declared_kernels_fails_at_first_use():
    normkit.register_backend(Backend("rtliar", runtime_module({}), kernels={"layernorm": ("forward",)}))
    with pytest.warns(RuntimeWarning, match="'rtliar' \\(registered at run time\\) was skipped"):
        with pytest.raises(ValueError, match="declares kernels it does not provide: layernorm:forward:float32"):
            normkit.get("ln")(ln_input(), 8, backend="rtliar")


def test_set_num_threads_errors():
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="set_num_threads: expected a positive int"):
            normkit.set_num_threads(bad)
    with pytest.raises(ValueError, match="threads requested, this machine has"):
        normkit.set_num_threads((os.cpu_count() or 1) + 1)
