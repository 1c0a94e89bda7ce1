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
LINE = "import peft_lota_autoload; peft_lota_autoload.activate()\n"


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


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m peft_lota_autoload", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["install", "uninstall", "status"])
    args = ap.parse_args(argv)
    pth = _site_packages() / PTH
    if args.action == "install":
        pth.write_text(LINE)
        print(f"wrote {pth}: `import peft` now registers LoTA and L4Q in this environment.")
    elif args.action == "uninstall":
        if pth.exists():
            pth.unlink()
        print(f"removed {pth}" if not pth.exists() else f"could not remove {pth}")
    else:
        print(f"{pth}: {'installed' if pth.exists() else 'not installed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
