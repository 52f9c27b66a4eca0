"""Build the Cython extensions in ext/ (one per subsystem).

BATON_DEBUG=1 (`make debug`) builds with Cython's bounds, wraparound and
initialisation checks, the kernels' `assert` statements and annotation HTML,
at -O0 -g. The default build is the release build (warnings as errors), where
Cython's bounds, wraparound and initialisation checks are off. BATON_DEBUG is an
environment switch of this build only: no kernel reads a macro of that name.
"""
import glob
import os

from setuptools import Extension, setup

DEBUG = os.environ.get("BATON_DEBUG") == "1"


def extensions():
    from Cython.Build import cythonize

    cflags = ["-O2", "-Werror", "-Wno-unreachable-code", "-Wno-unused-function"]
    directives = {
        "language_level": "3",
        "boundscheck": DEBUG,
        "wraparound": DEBUG,
        "initializedcheck": DEBUG,
        "cdivision": not DEBUG,
        "embedsignature": True,
    }
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
    if DEBUG:
        cflags = ["-O0", "-g", "-Werror", "-Wno-unused-function"]
    mods = []
    only = os.environ.get("BATON_EXT")  # e.g. BATON_EXT=sip builds ext/sip.pyx alone
    for pyx in sorted(glob.glob("ext/*.pyx")):
        if only and os.path.basename(pyx) != only + ".pyx":
            continue
        name = "ext." + os.path.splitext(os.path.basename(pyx))[0]
        mods.append(Extension(name, [pyx], extra_compile_args=cflags,
                              define_macros=macros, include_dirs=["ext/includes"]))
    return cythonize(mods, compiler_directives=directives, annotate=DEBUG,
                     include_path=["ext", "ext/includes"], quiet=True)


setup(ext_modules=extensions())
