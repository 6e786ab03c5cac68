"""Build the Cython backend's extension modules; the package metadata lives in pyproject.toml.

Compile flags (gcc/clang): -O3 plus the parts of -ffast-math that let the compiler split a float reduction into
vector lanes (reassociation), but not -ffinite-math-only / -fno-honor-nans, under which NaN and inf checks and
propagation are undefined. Without reassociation gcc vectorizes no reduction and the kernels run 1.6x slower.

Instruction sets: the default modules target the baseline of the architecture, so the install runs on any CPU
of it. On x86-64, the same C is compiled again for x86-64-v3 (AVX2, FMA) into the subpackage
``normkit_kernels.cython.x86_64_v3`` (about 1.7x faster than SSE2, where the kernels are compute-bound on the
baseline) and for x86-64-v4 (AVX-512, 512-bit vectors) into ``normkit_kernels.cython.x86_64_v4`` (the fused
activations' exp and division: GroupNorm + SiLU 1.0 -> 0.6-0.7x PyTorch's forward, 0.9-1.1 -> 0.65-0.8x its
backward here; the memory-bound passes the same); the backend uses the highest copy the CPU runs.

OpenMP is probed by compiling and linking a tiny program with the compiler's OpenMP flag. Without it the kernels
are built serial (the same code: prange runs as a plain loop) and ``normkit list`` says so. Environment:

    NORMKIT_NO_OPENMP=1     build without OpenMP even if the compiler has it
    NORMKIT_MARCH_NATIVE=1  build only for this machine's CPU (-march=native): the binary may not run on another
                            CPU
"""

import copy
import glob
import os
import platform
import shutil
import tempfile

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MODULES = ("_batchnorm", "_channels_last", "_groupnorm", "_layernorm", "_rownorm")
SOURCE_DIR = os.path.join("src", "normkit_kernels", "cython")
PACKAGE = "normkit_kernels.cython"
# (module, source without its extension): the kernels, then the compiled helper of normkit's core (the
# running-statistics update of normkit/running.py; beside the kernels, under src/, so that no source tree shadows
# its binary), which gets no x86-64 copies
SOURCES = [(f"{PACKAGE}.{name}", os.path.join(SOURCE_DIR, name)) for name in MODULES]
HELPERS = [("normkit_kernels._running_update", os.path.join("src", "normkit_kernels", "_running_update"))]

UNIX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math"]
UNIX_OPENMP = "-fopenmp"
MSVC_FLAGS = ["/O2"]
MSVC_OPENMP = "/openmp"
# The x86-64 copies: (subpackage, extra flags, the level's name for __builtin_cpu_supports, the macro that tells
# the modules it was built). gcc prefers 256-bit vectors for most AVX-512 targets; the fused activations gain from
# 512 on the CPUs measured (AMD EPYC).
X86_COPIES = (
    ("x86_64_v3", ["-march=x86-64-v3"], "x86-64-v3", "NORMKIT_HAVE_X86_64_V3_BUILD"),
    ("x86_64_v4", ["-march=x86-64-v4", "-mprefer-vector-width=512"], "x86-64-v4", "NORMKIT_HAVE_X86_64_V4_BUILD"),
)

OPENMP_PROBE = """
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return omp_get_max_threads() > 0 && n > 0 ? 0 : 1;
}
"""
# _common.pxd's one-thread shortcut for parallel regions: linked in where the linker wraps a symbol (GNU ld, lld)
# and the OpenMP runtime is libgomp's interface.
WRAP_GOMP = "-Wl,--wrap=GOMP_parallel"
WRAP_PROBE = OPENMP_PROBE.replace("#include <omp.h>", """#include <omp.h>
void __real_GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
void __wrap_GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) {
    __real_GOMP_parallel(fn, data, num_threads, flags);
}""")
# The run-time check that picks a copy (see _common.pxd) must compile too.
CPU_PROBE = 'int main(void) {{ __builtin_cpu_init(); return !__builtin_cpu_supports("{}"); }}\n'


def _env_flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _compiles(compiler, flags, source="int main(void) { return 0; }\n", link=False):
    """Whether ``compiler`` builds ``source`` with ``flags`` (and links it, if asked)."""
    tmp = tempfile.mkdtemp(prefix="normkit-probe-")
    try:
        path = os.path.join(tmp, "probe.c")
        with open(path, "w") as f:
            f.write(source)
        objects = compiler.compile([path], output_dir=tmp, extra_postargs=flags)
        if link:
            compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=flags)
        return True
    except Exception:  # any compile/link error means "not supported"
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read(path):
    with open(path) as f:
        return f.read()


def _c_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_helper(ext):
    return ext.name in dict(HELPERS)


def _copy_of(ext):
    """The x86-64 subpackage an extension belongs to, or None for a baseline module."""
    if _is_helper(ext):
        return None
    package = ext.name[len(PACKAGE) + 1:].rpartition(".")[0]
    return package or None


class BuildExt(build_ext):
    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:  # the modules are independent: compile them side by side
            self.parallel = True

    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        flags = MSVC_FLAGS if msvc else UNIX_FLAGS
        if not _compiles(self.compiler, flags):  # e.g. a compiler without the fine-grained math flags
            flags = flags[:1]
        native = _env_flag("NORMKIT_MARCH_NATIVE") and not msvc and _compiles(self.compiler, ["-march=native"])
        if native:
            flags = flags + ["-march=native"]

        openmp = MSVC_OPENMP if msvc else UNIX_OPENMP
        if _env_flag("NORMKIT_NO_OPENMP"):
            omp, note = [], "no (disabled by NORMKIT_NO_OPENMP at build time); kernels run serial"
        elif _compiles(self.compiler, [openmp], OPENMP_PROBE, link=True):
            omp, note = [openmp], "yes"
        else:
            omp, note = [], "no (the compiler has no OpenMP); kernels run serial"
        wrap = bool(omp) and not msvc and _compiles(self.compiler, omp + [WRAP_GOMP], WRAP_PROBE, link=True)

        x86 = not msvc and not native and platform.machine().lower() in ("x86_64", "amd64")
        copies = {package: (copy_flags, macro) for package, copy_flags, level, macro in X86_COPIES
                  if x86 and _compiles(self.compiler, copy_flags, CPU_PROBE.format(level))}
        self.extensions = [e for e in self.extensions if _copy_of(e) is None or _copy_of(e) in copies]
        built = "".join(f" (and a {' '.join(f)} copy)" for f, _ in copies.values())
        print(f"normkit: building the Cython kernels with {' '.join(flags + omp)}{built}; OpenMP: {note}")
        # normkit's helper: IEEE arithmetic as written, its results being NumPy's to the bit (no reassociation, no
        # FMA contraction, which gcc does by default wherever the target has FMA: -march=native in CFLAGS,
        # aarch64), and no threads
        helper = flags[:1] + [f for f in ["-ffp-contract=off"] if not msvc and _compiles(self.compiler, [f])]
        for ext in self.extensions:
            if _is_helper(ext):
                ext.extra_compile_args = helper
                continue
            package = _copy_of(ext)
            ext_flags = flags + (copies[package][0] if package else [])
            ext.extra_compile_args = ext_flags + omp
            ext.extra_link_args = [] if msvc else omp + ([WRAP_GOMP] if wrap else [])
            ext.define_macros = [
                ("NORMKIT_BUILD_FLAGS", _c_string(" ".join(ext_flags + omp))),
                ("NORMKIT_OPENMP_NOTE", _c_string(note)),
            ] + [(macro, "1") for _, macro in copies.values()]
            if wrap:
                ext.define_macros.append(("NORMKIT_WRAP_GOMP_PARALLEL", "1"))
        # setuptools skips a module whose binary is newer than its C, whatever flags it was built with; so a
        # change of flags (NORMKIT_NO_OPENMP, another compiler's probes) rebuilds everything
        config = repr([(e.name, e.extra_compile_args, e.define_macros) for e in self.extensions])
        stamp = os.path.join(self.build_temp, "normkit-build-config")
        if not os.path.exists(stamp) or _read(stamp) != config:
            self.force = True
        super().build_extensions()
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(config)

    def build_extension(self, ext):
        # The x86-64 copies compile the baseline modules' C files, whose objects would all go to one path in
        # build_temp: in a parallel build two copies of a module wrote it at once (a corrupt object, or one copy
        # linked with another's code). Each copy compiles into its own directory, through a shallow copy of this
        # command (the threads of a parallel build share this one).
        package = _copy_of(ext)
        if package is None:
            return super().build_extension(ext)
        command = copy.copy(self)
        command.build_temp = os.path.join(self.build_temp, package)
        return build_ext.build_extension(command, ext)

    def copy_extensions_to_source(self):
        # In-place and editable builds: the x86-64 subpackages have no Python files, so nothing else creates
        # their directories in the source tree.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            package = self.get_ext_fullname(ext.name).rpartition(".")[0]
            os.makedirs(build_py.get_package_dir(package), exist_ok=True)
        super().copy_extensions_to_source()


def _generated_c_is_current():
    """Whether each module's generated C exists and is newer than every .pyx / .pxd of the package.

    Then the C is compiled as it is, without cythonize: cythonize also compares the C with Cython's own .pxd files
    (libc, cython.parallel), which pip's isolated build environment installs afresh, with new times, for every
    build; so it would generate all the C again, and every module would compile again, on each ``pip install .``
    (3 minutes on 2 cores). Delete the .c files to generate them with another Cython.
    """
    ours = glob.glob(os.path.join(SOURCE_DIR, "*.pyx")) + glob.glob(os.path.join(SOURCE_DIR, "*.pxd")) \
        + [f"{path}.pyx" for _, path in HELPERS]
    generated = [f"{path}.c" for _, path in SOURCES + HELPERS]
    if not all(os.path.exists(c) for c in generated):
        return False
    return min(map(os.path.getmtime, generated)) > max(map(os.path.getmtime, ours))


if _generated_c_is_current():
    extensions = [Extension(name, [f"{path}.c"]) for name, path in SOURCES + HELPERS]
else:
    # _common.pxd holds inline loops only, so it is cimported by its bare name from this include path.
    extensions = cythonize(
        [Extension(name, [f"{path}.pyx"]) for name, path in SOURCES + HELPERS],
        include_path=[SOURCE_DIR],
        language_level=3,
    )
# The x86-64 copies compile the C that Cython generated for the baseline kernel modules; same module names, so the
# same init functions, each copy in its own subpackage. build_extensions drops them where they do not apply.
extensions += [Extension(f"{PACKAGE}.{package}.{ext.name.rsplit('.', 1)[1]}", list(ext.sources))
               for package, *_ in X86_COPIES for ext in extensions[:len(SOURCES)]]

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
