"""Build the Cython backend's extension modules; the package metadata lives in pyproject.toml.

Compile flags (gcc/clang): -O3 plus the parts of -ffast-math that let the compiler split a float reduction into
vector lanes (reassociation), but not -ffinite-math-only / -fno-honor-nans, under which NaN and inf checks and
propagation are undefined. Only flags the compiler accepts are used.

OpenMP is probed by compiling and linking a tiny program with the compiler's OpenMP flag. Without it the kernels
are built serial (the same code: prange runs as a plain loop) and ``normkit list`` says so. Environment:

    NORMKIT_NO_OPENMP=1     build without OpenMP even if the compiler has it
    NORMKIT_MARCH_NATIVE=1  add -march=native: faster on this machine, but the binary runs only on this CPU family
"""

import os
import shutil
import tempfile

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MODULES = ("_batchnorm", "_groupnorm", "_layernorm")

UNIX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math"]
UNIX_OPENMP = "-fopenmp"
MSVC_FLAGS = ["/O2"]
MSVC_OPENMP = "/openmp"

PROBE = """
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return omp_get_max_threads() > 0 && n > 0 ? 0 : 1;
}
"""


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
    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        flags = MSVC_FLAGS if msvc else UNIX_FLAGS
        if not _compiles(self.compiler, flags):  # e.g. a compiler without the fine-grained math flags
            flags = flags[:1]
        if _env_flag("NORMKIT_MARCH_NATIVE") and not msvc and _compiles(self.compiler, ["-march=native"]):
            flags.append("-march=native")
        openmp = MSVC_OPENMP if msvc else UNIX_OPENMP
        if _env_flag("NORMKIT_NO_OPENMP"):
            omp_flags, note = [], "no (disabled by NORMKIT_NO_OPENMP at build time); kernels run serial"
        elif _compiles(self.compiler, [openmp], PROBE, link=True):
            omp_flags, note = [openmp], "yes"
        else:
            omp_flags, note = [], "no (the compiler has no OpenMP); kernels run serial"
        print(f"normkit: building the Cython kernels with {' '.join(flags + omp_flags)}; OpenMP: {note}")
        for ext in self.extensions:
            ext.extra_compile_args = flags + omp_flags
            ext.extra_link_args = [] if msvc else omp_flags
            ext.define_macros = [
                ("NORMKIT_BUILD_FLAGS", _c_string(" ".join(flags + omp_flags))),
                ("NORMKIT_OPENMP_NOTE", _c_string(note)),
            ]
        super().build_extensions()


extensions = [
    Extension(f"normkit_kernels.cython.{name}", [f"kernels/cython/{name}.pyx"]) for name in MODULES
]

setup(
    # _common.pxd holds inline loops only, so it is cimported by its bare name from this include path
    ext_modules=cythonize(extensions, include_path=["kernels/cython"], language_level=3),
    cmdclass={"build_ext": BuildExt},
)
