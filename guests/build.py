"""Build the Rust and C example guests into build/guests/<lang>_<name>.wasm.

    python guests/build.py [--force] [--out DIR]

Rust: Debian's rustc-web, cargo-web and rust-web-src
(`apt-get install -y rustc-web cargo-web rust-web-src`). There is no
prebuilt wasm32 std for it, so cargo rebuilds std from rust-web-src
(-Zbuild-std, RUSTC_BOOTSTRAP=1, offline, crates from std's own vendor
directory), once per panic strategy, in build/rust/<strategy>/ (kept between
runs: a cold build is about a minute, a warm one a second). Every example is
built twice: panic=abort as rust_<name>.wasm and panic=unwind (real Wasm
exceptions) as rust_<name>_unwind.wasm. rustc-web ships no rust-lld: the
linker is `python -m ziglang wasm-ld` behind a small wrapper. $CORRAL_CARGO
and $CORRAL_RUSTC choose other binaries (a rustup install in ~/.cargo/bin,
often first on PATH, has no wasm32 std and no rust-src).

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

RUST = GUESTS / "rust"
CRATE = RUST / "corral-guest" / "src" / "lib.rs"
MANIFEST = RUST / "corral-guest" / "Cargo.toml"
RUST_EXAMPLES = ["echo", "kv", "panicky", "counter", "counter_durable"]
# the strategy, and the suffix of its outputs' names
PANIC_STRATEGIES = {"abort": "", "unwind": "_unwind"}
CARGO_CACHE = ROOT / "build" / "rust"
C_HEADER = GUESTS / "c" / "corral.h"
C_EXAMPLES = ["echo", "aborts"]

WASM_TARGET = "wasm32-unknown-unknown"
# What a panic is, per strategy; both export __stack_pointer, which corral
# restores after an escaped exception (guests/README.md, "Unwind").
RUST_FLAGS = {
    "abort": ["-Cpanic=abort", "-Clink-arg=--export=__stack_pointer"],
    "unwind": ["-Cpanic=unwind", "-Ctarget-feature=+exception-handling",
               # LLVM 22 still emits the legacy EH encoding by default; wasmtime rejects it
               "-Cllvm-args=-wasm-use-legacy-eh=false",
               "-Clink-arg=--export=__stack_pointer", "-Clink-arg=--export=__cpp_exception"],
}
BUILD_STD = {"abort": "std,panic_abort", "unwind": "std,panic_unwind"}
ZIG_FLAGS = [
    "--target=wasm32-freestanding",
    "-O2", "-g0",
    "-nostdlib",
    "-mbulk-memory",  # memcpy/memset become memory.copy/fill, not imports
    "-Wall", "-Wextra",
    "-Wl,--no-entry",
    "-Wl,--strip-debug",
]

RUST_PACKAGES = "Debian packages rustc-web, cargo-web and rust-web-src (apt-get install -y rustc-web cargo-web rust-web-src)"


def install_zig() -> str:
    """What to run for zig (in the test extra, so `./dev run` alone does not install it)."""
    return (f"run `{sys.executable} -m pip install 'ziglang>=0.13'` (or `./dev test` once: it installs "
            f"ziglang with the other test tools into .venv)")


class ToolchainMissing(RuntimeError):
    """No compiler for one of the guest languages."""


class BuildFailed(RuntimeError):
    """A compiler ran and refused the source."""


class RustToolchain:
    """cargo, rustc and the std sources that -Zbuild-std rebuilds for wasm32."""

    def __init__(self, cargo: str, rustc: str, library: Path):
        self.cargo, self.rustc, self.library = cargo, rustc, library


def rust_library(rustc: str) -> Path | None:
    """The std sources of `rustc` (rust-web-src's), with their vendored crates, or None."""
    try:
        sysroot = subprocess.run([rustc, "--print", "sysroot"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if sysroot.returncode != 0:
        return None
    library = Path(sysroot.stdout.strip()) / "lib" / "rustlib" / "src" / "rust" / "library"
    return library if (library / "std" / "Cargo.toml").is_file() and (library / "vendor").is_dir() else None


def find_rust(rustc_candidates: list[str] | None = None, cargo_candidates: list[str] | None = None) -> RustToolchain:
    if rustc_candidates is None:
        rustc_candidates = [os.environ.get("CORRAL_RUSTC", ""), "/usr/bin/rustc", shutil.which("rustc") or ""]
    if cargo_candidates is None:
        cargo_candidates = [os.environ.get("CORRAL_CARGO", ""), "/usr/bin/cargo", shutil.which("cargo") or ""]
    tried = []
    for rustc in dict.fromkeys(c for c in rustc_candidates if c):
        library = rust_library(rustc)
        if library is not None:
            break
        tried.append(rustc)
    else:
        raise ToolchainMissing(
            f"no rustc with its std sources for -Zbuild-std (tried: {', '.join(tried) or 'none found'}); "
            f"install the {RUST_PACKAGES}, or point CORRAL_RUSTC at a rustc that has them")
    cargo = next((c for c in dict.fromkeys(cargo_candidates) if c and os.access(c, os.X_OK)), None)
    if cargo is None:
        raise ToolchainMissing(f"no cargo; install the {RUST_PACKAGES}, or point CORRAL_CARGO at one")
    return RustToolchain(cargo, rustc, library)


def wasm_linker(cache: Path) -> Path:
    """rustc asks for rust-lld, which rustc-web lacks: a wrapper around zig's wasm-ld (or
    Debian's) that drops rustc's leading `-flavor wasm`."""
    if importlib.util.find_spec("ziglang") is not None:
        command = f"'{sys.executable}' -m ziglang wasm-ld"
    else:
        found = shutil.which("wasm-ld") or shutil.which("wasm-ld-22")
        if found is None:
            raise ToolchainMissing(f"no wasm linker: {install_zig()}; or install lld")
        command = f"'{found}'"
    script = f'#!/bin/sh\n[ "$1" = "-flavor" ] && shift 2\nexec {command} "$@"\n'
    wrapper = cache / "wasm-ld"
    if not wrapper.is_file() or wrapper.read_text() != script:
        cache.mkdir(parents=True, exist_ok=True)
        temporary = wrapper.with_name(f".wasm-ld.{os.getpid()}.tmp")
        temporary.write_text(script)
        temporary.chmod(0o755)
        os.replace(temporary, wrapper)
    return wrapper


def zig_cc() -> list[str]:
    if importlib.util.find_spec("ziglang") is None:
        raise ToolchainMissing(f"no C compiler for wasm32: {install_zig()}")
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


def rust_sources() -> list[Path]:
    return [CRATE, MANIFEST, Path(__file__).resolve(),
            *(RUST / "examples" / f"{example}.rs" for example in RUST_EXAMPLES)]


def cargo_build(toolchain: RustToolchain, strategy: str, linker: Path) -> Path:
    """Build every example with one panic strategy; the folder that holds the .wasm files."""
    target_dir = CARGO_CACHE / strategy
    flags = [*RUST_FLAGS[strategy], f"-Clinker={linker}",
             # panic locations read examples/counter.rs, not ../examples/counter.rs
             "--remap-path-prefix=../="]
    env = {**os.environ, "RUSTC_BOOTSTRAP": "1", "RUSTC": toolchain.rustc,
           "CARGO_ENCODED_RUSTFLAGS": "\x1f".join(flags)}
    for name in ("RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "CARGO_BUILD_TARGET", "RUSTC_WRAPPER"):
        env.pop(name, None)
    command = [toolchain.cargo, "build", "--offline", "--release", "--quiet",
               "--target", WASM_TARGET, f"-Zbuild-std={BUILD_STD[strategy]}",
               "--examples", "--manifest-path", str(MANIFEST), "--target-dir", str(target_dir),
               "--config", 'source.crates-io.replace-with="corral-std-vendor"',
               "--config", f'source.corral-std-vendor.directory="{toolchain.library / "vendor"}"']
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise BuildFailed(f"building the Rust examples (panic={strategy}) failed:\n"
                          f"$ {' '.join(command)}\n{done.stderr.strip()}")
    return target_dir / WASM_TARGET / "release" / "examples"


def build_rust(out: Path, force: bool = False) -> dict[str, Path]:
    outputs = {f"rust_{example}{suffix}": (strategy, example)
               for strategy, suffix in PANIC_STRATEGIES.items() for example in RUST_EXAMPLES}
    toolchain = find_rust()
    # a new rustc rebuilds everything, even outputs newer than their sources
    version = subprocess.run([toolchain.rustc, "-vV"], capture_output=True, text=True, check=True).stdout
    stamp = out / "rustc.txt"
    stamp_text = f"{toolchain.rustc}\n{version}"
    if not stamp.is_file() or stamp.read_text() != stamp_text:
        force = True
    sources = rust_sources()
    if not force and all(fresh(out / f"{name}.wasm", sources) for name in outputs):
        return {name: out / f"{name}.wasm" for name in outputs}
    linker = wasm_linker(CARGO_CACHE)
    built = {}
    for strategy in PANIC_STRATEGIES:
        folder = cargo_build(toolchain, strategy, linker)
        for name, (of, example) in outputs.items():
            if of != strategy:
                continue
            wasm = out / f"{name}.wasm"
            temporary = wasm.with_name(f".{wasm.name}.{os.getpid()}.tmp")
            shutil.copyfile(folder / f"{example}.wasm", temporary)
            os.replace(temporary, wasm)
            built[name] = wasm
    stamp.write_text(stamp_text)
    return built


def build_c(out: Path, force: bool = False, examples: list[str] = C_EXAMPLES,
            flags: tuple[str, ...] = ()) -> dict[str, Path]:
    """Each C example as c_NAME.wasm, with `flags` beside ZIG_FLAGS."""
    cc = zig_cc()
    this_script = Path(__file__).resolve()
    built = {}
    for example in examples:
        source = GUESTS / "c" / "examples" / f"{example}.c"
        name = f"c_{example}"
        wasm = out / f"{name}.wasm"
        if force or not fresh(wasm, [source, C_HEADER, this_script]):
            run([*cc, *ZIG_FLAGS, *flags, "-I", C_HEADER.parent, source], wasm)
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
    return build_c(out, force, C_UNWIND_EXAMPLES, (*C_UNWIND_FLAGS, *UNWIND_EXAMPLE_LINK))


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
