"""Build the Cython backend's extension modules; the package metadata lives in pyproject.toml.

Compile flags (gcc/clang): -O3 plus the parts of -ffast-math that let the compiler split a float reduction into
vector lanes (reassociation), but not -ffinite-math-only / -fno-honor-nans, under which NaN and inf checks and
propagation are undefined. Without reassociation gcc vectorizes no reduction and the kernels run 1.6x slower.

Instruction sets: the default modules target the baseline of the architecture, so the install runs on any CPU
of it. On x86-64, the same C is compiled a second time with -march=x86-64-v3 (AVX2, FMA) into the subpackage
``normkit_kernels.cython.x86_64_v3``; the backend uses that copy when the CPU supports it (about 1.7x faster
than SSE2 here, where the kernels are compute-bound on the baseline).

OpenMP is probed by compiling and linking a tiny program with the compiler's OpenMP flag. Without it the kernels
are built serial (the same code: prange runs as a plain loop) and ``normkit list`` says so. Environment:

    NORMKIT_NO_OPENMP=1     build without OpenMP even if the compiler has it
    NORMKIT_MARCH_NATIVE=1  build only for this machine's CPU (-march=native): a little faster than x86-64-v3
                            where AVX-512 helps, but the binary may not run on another CPU
"""

import os
import platform
import shutil
import tempfile

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MODULES = ("_batchnorm", "_channels_last", "_groupnorm", "_layernorm", "_rownorm")
PACKAGE = "normkit_kernels.cython"
V3_PACKAGE = PACKAGE + ".x86_64_v3"

UNIX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math"]
UNIX_OPENMP = "-fopenmp"
MSVC_FLAGS = ["/O2"]
MSVC_OPENMP = "/openmp"
V3_FLAG = "-march=x86-64-v3"

OPENMP_PROBE = """
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return omp_get_max_threads() > 0 && n > 0 ? 0 : 1;
}
"""
# The run-time check that picks the x86-64-v3 modules (see _common.pxd) must compile too.
CPU_PROBE = 'int main(void) { __builtin_cpu_init(); return !__builtin_cpu_supports("x86-64-v3"); }\n'


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


def _c_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


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

        v3 = (
            not msvc and not native and platform.machine().lower() in ("x86_64", "amd64")
            and _compiles(self.compiler, [V3_FLAG], CPU_PROBE)
        )
        if not v3:
            self.extensions = [e for e in self.extensions if not e.name.startswith(V3_PACKAGE)]
        print(f"normkit: building the Cython kernels with {' '.join(flags + omp)}"
              f"{f' (and a {V3_FLAG} copy)' if v3 else ''}; OpenMP: {note}")
        for ext in self.extensions:
            ext_flags = flags + [V3_FLAG] if ext.name.startswith(V3_PACKAGE) else flags
            ext.extra_compile_args = ext_flags + omp
            ext.extra_link_args = [] if msvc else omp
            ext.define_macros = [
                ("NORMKIT_BUILD_FLAGS", _c_string(" ".join(ext_flags + omp))),
                ("NORMKIT_OPENMP_NOTE", _c_string(note)),
            ] + ([("NORMKIT_HAVE_X86_64_V3_BUILD", "1")] if v3 else [])
        super().build_extensions()

    def copy_extensions_to_source(self):
        # In-place and editable builds: the x86-64-v3 subpackage has no Python files, so nothing else creates
        # its directory in the source tree.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            package = self.get_ext_fullname(ext.name).rpartition(".")[0]
            os.makedirs(build_py.get_package_dir(package), exist_ok=True)
        super().copy_extensions_to_source()


# _common.pxd holds inline loops only, so it is cimported by its bare name from this include path.
extensions = cythonize(
    [Extension(f"{PACKAGE}.{name}", [f"kernels/cython/{name}.pyx"]) for name in MODULES],
    include_path=["kernels/cython"],
    language_level=3,
)
# The x86-64-v3 copies compile the C that Cython generated for the baseline modules; same module names, so the
# same init functions, in their own subpackage. build_extensions drops them where they do not apply.
extensions += [Extension(f"{V3_PACKAGE}.{ext.name.rsplit('.', 1)[1]}", list(ext.sources)) for ext in extensions]

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
