"""The C++ runtime for guests that throw: libc++abi, libunwind and a slice of
libc++, compiled from the sources zig ships, for Wasm exceptions.

    python guests/cxxrt.py [--out DIR]     # build/cxxrt/<key>/libcxxrt.a

zig's own C++ runtime for wasm32-wasi is built with -fno-exceptions, so a
`throw` through it aborts. This module builds the pieces again with the
flags every object of a throwing guest must share (EH_FLAGS):

- libc++abi (`ziglang/lib/libcxxabi/src/*.cpp`, minus cxa_noexception.cpp,
  the -fno-exceptions stand-in, and cxa_thread_atexit.cpp, which needs
  threads): __cxa_throw, the personality routine, typeinfo, operator new.
- libunwind's Unwind-wasm.c: _Unwind_RaiseException is a Wasm `throw`
  with the `__cpp_exception` tag and the _Unwind_Exception* as payload.
- from libc++: stdexcept.cpp (the std::runtime_error family), string.cpp
  (std::string's out-of-line members, whose throws become catchable) and
  exception.cpp (std::uncaught_exceptions).
- guests/cpp/runtime/tag.S: the definition of the `__cpp_exception` tag,
  which zig does not ship; abort.cpp: libc++'s verbose abort as a trap,
  so the runtime pulls in no stdio and the guest imports nothing.

Objects are cached under build/cxxrt/<key>, the key a digest of the zig
version, the flags and this runtime's own sources: the first build takes
about 6 s on 2 cores, later ones reuse it. Guests link against the archive
with `zig cc` (never `zig c++`, which adds zig's -fno-exceptions runtime).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

GUESTS = Path(__file__).resolve().parent
ROOT = GUESTS.parent
OUT = ROOT / "build" / "cxxrt"
RUNTIME_SOURCES = GUESTS / "cpp" / "runtime"

TARGET = ["-target", "wasm32-wasi"]
# -mexception-handling: the Wasm feature (without it clang crashes on C++
# cleanups: "Cannot select cleanupret"); -fwasm-exceptions: C++ throw/catch
# lowered to it; -wasm-use-legacy-eh=false: the exnref encoding (try_table),
# since clang 22 still defaults to the legacy try/catch that wasmtime rejects.
EH_FLAGS = ["-mexception-handling", "-fwasm-exceptions", "-mllvm", "-wasm-use-legacy-eh=false"]
COMMON = [*TARGET, "-O2", "-g0", *EH_FLAGS]
CXX_STD = "-std=c++23"
LIBRARY_FLAGS = [
    CXX_STD, "-D_LIBCPP_BUILDING_LIBRARY", "-D_LIBCXXABI_BUILDING_LIBRARY",
    "-DLIBCXX_BUILDING_LIBCXXABI",   # libc++ leaves what libc++abi defines to it
    "-D_LIBCXXABI_HAS_NO_THREADS",
    # abort_message.cpp without stderr: no fprintf, so no WASI imports
    "-DNDEBUG", "-DLIBCXXABI_BAREMETAL",
    # std::terminate traps without demangling the exception's type first:
    # the demangler is 120 KiB of a 160 KiB guest, for a message nobody reads
    "-DLIBCXXABI_SILENT_TERMINATE",
    "-fvisibility=hidden",
]
UNWIND_FLAGS = [
    "-D_LIBUNWIND_IS_NATIVE_ONLY", "-D_LIBUNWIND_HAS_NO_THREADS",
    "-D_LIBUNWIND_HIDE_SYMBOLS",     # without it: a __declspec error on wasm
]
CXXABI_SKIPPED = {"cxa_noexception.cpp", "cxa_thread_atexit.cpp"}
LIBCXX_SOURCES = ["stdexcept.cpp", "string.cpp", "exception.cpp"]

# How a throwing guest is linked: a reactor (no _start, so no WASI imports
# for argv and exit; corral_init runs the static constructors), with the
# shadow-stack pointer and the tag exported for the host (docs/guest-abi.md).
LINK_FLAGS = [
    *TARGET, *EH_FLAGS, "-mexec-model=reactor",
    "-Wl,--no-entry", "-Wl,--strip-debug",
    "-Wl,--export=__stack_pointer", "-Wl,--export=__cpp_exception",
]

# zig is in the test extra: after `./dev run` alone it is not installed (guests/build.py says the same).
INSTALL_ZIG = (f"run `{sys.executable} -m pip install 'ziglang>=0.13'` (or `./dev test` once: it installs "
               f"ziglang with the other test tools into .venv)")


class ToolchainMissing(RuntimeError):
    """No zig to build the runtime with."""


class BuildFailed(RuntimeError):
    """zig refused a source."""


@dataclass(frozen=True)
class Runtime:
    archive: Path
    cxx: list[str]          # compile a C++ guest source: cxx + [-c, src, -o, obj]
    link: list[str]         # link: link + [objects..., archive, -o, wasm]


def zig() -> list[str]:
    if importlib.util.find_spec("ziglang") is None:
        raise ToolchainMissing(f"no C++ compiler for wasm32: {INSTALL_ZIG}")
    return [sys.executable, "-m", "ziglang"]


def zig_lib() -> Path:
    spec = importlib.util.find_spec("ziglang")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def zig_version() -> str:
    return subprocess.run([*zig(), "version"], capture_output=True, text=True, check=True).stdout.strip()


def units(lib: Path) -> list[tuple[str, list[str], Path]]:
    """(object name, compiler and flags, source) for every runtime object."""
    zc, zcxx = [*zig(), "cc"], [*zig(), "c++"]
    includes = ["-I", str(lib / "libcxxabi" / "include"), "-I", str(lib / "libcxx" / "src")]
    found = []
    for source in sorted((lib / "libcxxabi" / "src").glob("*.cpp")):
        if source.name not in CXXABI_SKIPPED:
            found.append((f"cxxabi_{source.stem}.o", [*zcxx, *COMMON, *LIBRARY_FLAGS, *includes], source))
    for name in LIBCXX_SOURCES:
        found.append((f"cxx_{Path(name).stem}.o", [*zcxx, *COMMON, *LIBRARY_FLAGS, *includes],
                      lib / "libcxx" / "src" / name))
    found.append(("unwind_wasm.o", [*zc, *COMMON, *UNWIND_FLAGS, "-I", str(lib / "libunwind" / "include")],
                  lib / "libunwind" / "src" / "Unwind-wasm.c"))
    found.append(("tag.o", [*zc, *COMMON], RUNTIME_SOURCES / "tag.S"))
    found.append(("abort.o", [*zcxx, *COMMON, CXX_STD, "-D_LIBCPP_BUILDING_LIBRARY"], RUNTIME_SOURCES / "abort.cpp"))
    return found


def cache_key() -> str:
    digest = hashlib.sha256()
    digest.update(zig_version().encode())
    for part in (COMMON, LIBRARY_FLAGS, UNWIND_FLAGS, sorted(CXXABI_SKIPPED), LIBCXX_SOURCES):
        digest.update(repr(part).encode())
    for source in sorted(RUNTIME_SOURCES.iterdir()):
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()[:16]


def compile_one(command: list[str], source: Path, output: Path) -> None:
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    done = subprocess.run([*command, "-c", str(source), "-o", str(temporary)], capture_output=True, text=True)
    if done.returncode != 0:
        temporary.unlink(missing_ok=True)
        raise BuildFailed(f"building the C++ runtime: {source.name} failed:\n{done.stderr.strip()}")
    os.replace(temporary, output)


def build_runtime(out: Path | str = OUT) -> Runtime:
    """Build (or find cached) libcxxrt.a; return it with the guest compile and link commands."""
    lib = zig_lib()
    folder = Path(out) / cache_key()
    archive = folder / "libcxxrt.a"
    runtime = Runtime(archive, cxx=[*zig(), "c++", *COMMON, CXX_STD], link=[*zig(), "cc", *LINK_FLAGS])
    if archive.exists():
        return runtime
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.iterdir():   # built by another zig or other flags
        if stale.is_dir() and stale != folder:
            shutil.rmtree(stale, ignore_errors=True)
    todo = [(command, source, folder / name) for name, command, source in units(lib)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for future in [pool.submit(compile_one, c, s, o) for c, s, o in todo if not o.exists()]:
            future.result()
    temporary = archive.with_name(f".{archive.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    done = subprocess.run([*zig(), "ar", "rcs", str(temporary), *(str(o) for _, _, o in todo)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        temporary.unlink(missing_ok=True)
        raise BuildFailed(f"archiving the C++ runtime failed:\n{done.stderr.strip()}")
    os.replace(temporary, archive)
    return runtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(OUT), help=f"cache folder (default {OUT})")
    args = parser.parse_args(argv)
    try:
        print(build_runtime(args.out).archive)
    except (ToolchainMissing, BuildFailed) as error:
        print(f"guests/cxxrt.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
