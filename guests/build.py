"""Build the Rust and C example guests into build/guests/<lang>_<name>.wasm.

    python guests/build.py [--force] [--out DIR]

Rust: rustc (no cargo) with the wasm32-unknown-unknown standard library,
which Debian ships as `apt-get install -y rustc libstd-rust-dev-wasm32`.
A rustup rustc earlier on PATH often lacks that target, so every candidate
is probed and the first whose target libdir holds libstd wins ($CORRAL_RUSTC
first, then /usr/bin/rustc, then rustc on PATH). The crate corral-guest is
built as an rlib, then each example as a panic=abort cdylib against it.

C: zig's clang, from `pip install ziglang`, for wasm32-freestanding; the
C examples that panic by unwinding get the Wasm exception flags too.

C++: zig's clang for wasm32-wasi with Wasm exceptions, against the C++
runtime guests/cxxrt.py builds (and caches under build/cxxrt/) from the
sources zig ships.

Outputs newer than their sources (and built by the same rustc) are kept.
A pytest fixture can call build_all() and get {name: path}; a missing
toolchain raises ToolchainMissing, whose message names the package.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

GUESTS = Path(__file__).resolve().parent
ROOT = GUESTS.parent
OUT = ROOT / "build" / "guests"

CRATE = GUESTS / "rust" / "corral-guest" / "src" / "lib.rs"
RUST_EXAMPLES = ["echo", "kv", "panicky", "counter"]
C_HEADER = GUESTS / "c" / "corral.h"
C_EXAMPLES = ["echo", "aborts"]

WASM_TARGET = "wasm32-unknown-unknown"
RUSTC_FLAGS = [
    "--edition", "2021",
    "--target", WASM_TARGET,
    "-C", "opt-level=2",
    "-C", "panic=abort",
    # std's rlibs carry DWARF: without this a 30 KiB guest weighs 5 MiB
    "-C", "strip=debuginfo",
]
ZIG_FLAGS = [
    "--target=wasm32-freestanding",
    "-O2", "-g0",
    "-nostdlib",
    "-mbulk-memory",  # memcpy/memset become memory.copy/fill, not imports
    "-Wall", "-Wextra",
    "-Wl,--no-entry",
    "-Wl,--strip-debug",
]

RUST_PACKAGES = "Debian packages rustc and libstd-rust-dev-wasm32 (apt-get install -y rustc libstd-rust-dev-wasm32)"
ZIG_PACKAGE = "the PyPI package ziglang (pip install ziglang)"


class ToolchainMissing(RuntimeError):
    """No compiler for one of the guest languages."""


class BuildFailed(RuntimeError):
    """A compiler ran and refused the source."""


def rustc_has_wasm_std(rustc: str) -> bool:
    try:
        libdir = subprocess.run(
            [rustc, "--print", "target-libdir", "--target", WASM_TARGET],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    if libdir.returncode != 0:
        return False
    path = Path(libdir.stdout.strip())
    return path.is_dir() and any(path.glob("libstd-*.rlib"))


def find_rustc(candidates: list[str] | None = None) -> str:
    if candidates is None:
        candidates = [os.environ.get("CORRAL_RUSTC", ""), "/usr/bin/rustc", shutil.which("rustc") or ""]
    tried = []
    for rustc in dict.fromkeys(c for c in candidates if c):
        if rustc_has_wasm_std(rustc):
            return rustc
        tried.append(rustc)
    raise ToolchainMissing(
        f"no rustc with the {WASM_TARGET} standard library (tried: {', '.join(tried) or 'none found'}); "
        f"install the {RUST_PACKAGES}, or point CORRAL_RUSTC at a rustc that has the target"
    )


def zig_cc() -> list[str]:
    if importlib.util.find_spec("ziglang") is None:
        raise ToolchainMissing(f"no C compiler for wasm32: install {ZIG_PACKAGE} into {sys.executable}")
    return [sys.executable, "-m", "ziglang", "cc"]


def fresh(output: Path, sources: list[Path]) -> bool:
    if not output.exists():
        return False
    built = output.stat().st_mtime_ns
    return all(source.stat().st_mtime_ns <= built for source in sources)


def run(command: list[str], output: Path) -> None:
    """Run a compiler writing `output`; move it into place only when done."""
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    command = [str(c) for c in command] + ["-o", str(temporary)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        temporary.unlink(missing_ok=True)
        raise BuildFailed(f"building {output.name} failed:\n$ {' '.join(command)}\n{done.stderr.strip()}")
    if done.stderr.strip():
        print(f"warnings building {output.name}:\n{done.stderr.strip()}", file=sys.stderr)
    os.replace(temporary, output)


def build_rust(out: Path, force: bool = False) -> dict[str, Path]:
    rustc = find_rustc()
    # An rlib only links with the rustc that built it: rebuild on a change.
    version = subprocess.run([rustc, "-vV"], capture_output=True, text=True, check=True).stdout
    stamp = out / "rustc.txt"
    stamp_text = f"{rustc}\n{version}"
    if not stamp.exists() or stamp.read_text() != stamp_text:
        force = True
    this_script = Path(__file__).resolve()

    rlib = out / "libcorral_guest.rlib"
    if force or not fresh(rlib, [CRATE, this_script]):
        run([rustc, *RUSTC_FLAGS, "--crate-type", "rlib", "--crate-name", "corral_guest", CRATE], rlib)
    stamp.write_text(stamp_text)

    built = {}
    for example in RUST_EXAMPLES:
        source = GUESTS / "rust" / "examples" / f"{example}.rs"
        name = f"rust_{example}"
        wasm = out / f"{name}.wasm"
        if force or not fresh(wasm, [source, rlib, this_script]):
            run([rustc, *RUSTC_FLAGS, "--crate-type", "cdylib", "--crate-name", name,
                 "--extern", f"corral_guest={rlib}", source], wasm)
        built[name] = wasm
    return built


def build_c(out: Path, force: bool = False) -> dict[str, Path]:
    cc = zig_cc()
    this_script = Path(__file__).resolve()
    built = {}
    for example in C_EXAMPLES:
        source = GUESTS / "c" / "examples" / f"{example}.c"
        name = f"c_{example}"
        wasm = out / f"{name}.wasm"
        if force or not fresh(wasm, [source, C_HEADER, this_script]):
            run([*cc, *ZIG_FLAGS, "-I", C_HEADER.parent, source], wasm)
        built[name] = wasm
    return built


# --- C and C++ guests that unwind (Wasm exceptions) ------------------------

C_UNWIND_EXAMPLES = ["panics"]
CPP_HEADER = GUESTS / "cpp" / "corral.hpp"
CPP_EXAMPLES = ["throws"]
# corral_panic's `throw` needs the feature; the exports let the host
# restore the shadow stack after an escape and recognise the tag. (C never
# catches, and `throw` is the same in both EH encodings, so C needs no
# -wasm-use-legacy-eh=false; clang refuses it without -fwasm-exceptions.)
C_UNWIND_FLAGS = [
    "-mexception-handling",
    "-Wl,--export=__stack_pointer", "-Wl,--export=__cpp_exception",
]
# The examples' shadow stack: 64 KiB instead of zig's 1 MiB (C) or 16 MiB
# (C++), so that a host which does not restore __stack_pointer after an
# escape faults them within a few hundred escapes, where a test sees it.
UNWIND_EXAMPLE_LINK = ["-Wl,-z,stack-size=65536"]


def load_cxxrt():
    """guests/cxxrt.py as a module (guests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("corral_guest_cxxrt", GUESTS / "cxxrt.py")
    if spec.name not in sys.modules:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[spec.name]


def build_c_unwind(out: Path, force: bool = False) -> dict[str, Path]:
    cc = zig_cc()
    this_script = Path(__file__).resolve()
    built = {}
    for example in C_UNWIND_EXAMPLES:
        source = GUESTS / "c" / "examples" / f"{example}.c"
        name = f"c_{example}"
        wasm = out / f"{name}.wasm"
        if force or not fresh(wasm, [source, C_HEADER, this_script]):
            run([*cc, *ZIG_FLAGS, *C_UNWIND_FLAGS, *UNWIND_EXAMPLE_LINK, "-I", C_HEADER.parent, source], wasm)
        built[name] = wasm
    return built


def build_cpp(out: Path, force: bool = False) -> dict[str, Path]:
    cxxrt = load_cxxrt()
    zig_cc()  # the same ToolchainMissing as the C guests when zig is absent
    try:
        runtime = cxxrt.build_runtime(out.parent / "cxxrt")
    except cxxrt.BuildFailed as failure:
        raise BuildFailed(str(failure)) from None
    this_script = Path(__file__).resolve()
    built = {}
    for example in CPP_EXAMPLES:
        source = GUESTS / "cpp" / "examples" / f"{example}.cpp"
        name = f"cpp_{example}"
        wasm = out / f"{name}.wasm"
        if force or not fresh(wasm, [source, CPP_HEADER, runtime.archive, this_script, GUESTS / "cxxrt.py"]):
            obj = out / f"{name}.o"
            run([*runtime.cxx, "-Wall", "-Wextra", "-I", CPP_HEADER.parent, "-c", source], obj)
            run([*runtime.link, *UNWIND_EXAMPLE_LINK, obj, runtime.archive], wasm)
            obj.unlink()
        built[name] = wasm
    return built


def build_all(out: Path | str = OUT, force: bool = False) -> dict[str, Path]:
    """Build every example guest; return {"rust_echo": Path(...), ...}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {**build_rust(out, force), **build_c(out, force), **build_c_unwind(out, force), **build_cpp(out, force)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when outputs are fresh")
    parser.add_argument("--out", default=str(OUT), help=f"output folder (default {OUT})")
    args = parser.parse_args(argv)
    try:
        built = build_all(args.out, args.force)
    except (ToolchainMissing, BuildFailed) as error:
        print(f"guests/build.py: {error}", file=sys.stderr)
        return 1
    for path in built.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
