"""Make `import peft` register peft_lota's methods, so that saved LoTA / L4Q adapters load without `import peft_lota`.

PEFT has no plugin discovery: loading an adapter whose peft_type is LOTA or L4Q fails with `KeyError: 'LOTA'`
unless `import peft_lota` ran first. This opt-in hook fixes that for every script of a Python environment:

    python -m peft_lota_autoload install      # writes peft_lota_autoload.pth into site-packages
    python -m peft_lota_autoload uninstall
    python -m peft_lota_autoload status

The .pth file runs `import peft_lota_autoload` at interpreter start; this module imports nothing but `sys` (it
adds one entry to sys.meta_path: ~2 ms, measured with `python -X importtime`), and only when `peft` itself is
imported does it import peft_lota right after it (about a second more on `import peft` on a 2-core machine).
It is opt-in because a .pth file affects every Python process of the environment.
"""

from __future__ import annotations

import sys

PTH = "peft_lota_autoload.pth"
# The line the .pth holds: it does nothing once this module is gone or broken (`pip uninstall peft_lota` leaves the .pth
# behind: pip did not install it), so no Python start of the environment ever prints an error because of it.
LINE = ("import sys; exec('try:\\n import peft_lota_autoload as m\\n m.activate()\\nexcept Exception:\\n pass')\n")
OURS = (LINE, "import sys; exec('try:\\n import peft_lota_autoload as m\\nexcept ImportError:\\n pass\\n"
              "else:\\n m.activate()')\n",
        "import peft_lota_autoload; peft_lota_autoload.activate()\n")  # (and the lines earlier releases wrote)


class _AfterPeft:
    """A meta-path finder and loader (no importlib.abc: it would cost ~10 ms at every start): finds `peft` with the
    other finders, and imports peft_lota right after peft's own module code ran."""

    def find_spec(self, name, path=None, target=None):
        if name != "peft":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec("peft")
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        import importlib

        self._inner.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]
        try:
            importlib.import_module("peft_lota")
        except Exception as err:  # noqa: BLE001 - never break `import peft` itself
            print(f"peft_lota_autoload: could not import peft_lota ({err!r}); LoTA/L4Q adapters need "
                  "`import peft_lota` before loading.", file=sys.stderr)


def activate() -> None:
    """Install the import hook (what the .pth file calls); no effect if peft is imported already."""
    if "peft" in sys.modules:
        if "peft_lota" not in sys.modules:
            try:
                import importlib

                importlib.import_module("peft_lota")
            except Exception:  # noqa: BLE001
                pass
        return
    if not any(isinstance(f, _AfterPeft) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeft())


def _site_packages():
    import sysconfig
    from pathlib import Path

    return Path(sysconfig.get_paths()["purelib"])


def _ours(pth) -> bool:
    """Whether the file at `pth` is one this module wrote: a regular file (not a link) holding exactly our line."""
    try:
        return not pth.is_symlink() and pth.is_file() and pth.read_text() in OURS
    except (OSError, UnicodeDecodeError):
        return False


def _install(pth) -> str:
    import os

    if os.path.lexists(pth) and not _ours(pth):
        raise RuntimeError(f"{pth} exists and was not written by peft_lota_autoload (a link, or other lines): left "
                           "as it is. Remove or rename it yourself, then install again.")
    tmp = pth.with_name(f".{pth.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # O_EXCL: never through a link
    try:
        with os.fdopen(fd, "w") as f:
            f.write(LINE)
        os.replace(tmp, pth)  # a link at pth is replaced, never written through
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return f"wrote {pth}: `import peft` now registers LoTA and L4Q in this environment."


def _uninstall(pth) -> str:
    import os

    if not os.path.lexists(pth):
        return f"{pth}: not installed, nothing to remove."
    if not _ours(pth):
        raise RuntimeError(f"{pth} was not written by peft_lota_autoload (a link, or other lines): left as it is.")
    pth.unlink()
    return f"removed {pth}"


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m peft_lota_autoload", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["install", "uninstall", "status"])
    args = ap.parse_args(argv)
    pth = _site_packages() / PTH
    try:
        if args.action == "install":
            print(_install(pth))
        elif args.action == "uninstall":
            print(_uninstall(pth))
        else:
            state = "installed" if _ours(pth) else "not ours (left alone)" if __import__("os").path.lexists(pth) \
                else "not installed"
            print(f"{pth}: {state}")
    except (RuntimeError, OSError) as err:
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"python -m peft_lota_autoload {args.action}: {where}{getattr(err, 'strerror', None) or err}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
