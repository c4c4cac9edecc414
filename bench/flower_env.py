"""A pinned, private virtualenv for Flower, used by the Flower side-by-side benchmarks.

Flower never enters fedstack's environment: :func:`ensure_flower_venv` creates
``bench/.flower-venv`` (git-ignored) with

- ``flwr[simulation]==1.42.0`` (its ``simulation`` extra pins ``ray==2.55.1`` on Python 3.11),
- ``torch==2.13.0`` (the local CPU build; a loose ``torch`` would pull the CUDA wheels),
- scikit-learn and numpy at the versions fedstack's own venv has (same data, same maths),
- fedstack itself, editable and without dependencies (``pip install -e . --no-deps``), so the
  Flower apps import *the same* partition, trainer and evaluator code as fedstack's agents.

It is idempotent: a stamp file records the pinned requirement set, and a venv whose stamp and
installed versions match is reused as is. Run it alone to (re)build or check the venv::

    .venv/bin/python bench/flower_env.py          # create or verify, print the versions
    .venv/bin/python bench/flower_env.py --force  # rebuild from scratch
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV = BENCH / ".flower-venv"
STAMP = VENV / "fedstack-bench-stamp.json"

FLWR_VERSION = "1.42.0"
RAY_VERSION = "2.55.1"  # what flwr 1.42.0's [simulation] extra pins for Python 3.11-3.12
TORCH_VERSION = "2.13.0"
INSTALL_TIMEOUT = 1800.0


def _fedstack_versions() -> dict[str, str]:
    """numpy and scikit-learn as in fedstack's venv, so both sides compute the same."""
    from importlib.metadata import version

    return {"numpy": version("numpy"), "scikit-learn": version("scikit-learn")}


def _fedstack_runtime() -> list[str]:
    """fedstack's own runtime requirements (fedstack is installed with --no-deps, and the
    Flower app imports its data, trainers and evaluators), numpy and scikit-learn aside."""
    from importlib.metadata import requires

    out = []
    for req in requires("fedstack") or []:
        if "extra ==" in req:
            continue
        name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower()
        if name not in ("numpy", "scikit-learn"):
            out.append(req)
    return out


def requirements() -> list[str]:
    """The pinned requirement lines installed into the Flower venv."""
    same = _fedstack_versions()
    return [
        f"flwr[simulation]=={FLWR_VERSION}",
        f"ray=={RAY_VERSION}",
        f"torch=={TORCH_VERSION}",
        f"numpy=={same['numpy']}",
        f"scikit-learn=={same['scikit-learn']}",
        "psutil",
        *_fedstack_runtime(),
    ]


def python() -> Path:
    """The Flower venv's interpreter."""
    return VENV / "bin" / "python"


def bin_path(name: str) -> Path:
    """A console script of the Flower venv (``flwr``, ``flower-superlink``, ...)."""
    return VENV / "bin" / name


def installed_versions() -> dict[str, str]:
    """Versions of the key packages inside the Flower venv (empty when it is unusable)."""
    if not python().exists():
        return {}
    code = (
        "import json\nfrom importlib.metadata import version, PackageNotFoundError\n"
        "out = {}\n"
        "for n in ('flwr', 'ray', 'torch', 'numpy', 'scikit-learn', 'grpcio', 'fedstack'):\n"
        "    try:\n        out[n] = version(n)\n"
        "    except PackageNotFoundError:\n        pass\n"
        "print(json.dumps(out))\n"
    )
    try:
        out = subprocess.run(
            [str(python()), "-c", code], capture_output=True, text=True, timeout=120, check=True
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return {}
    versions: dict[str, str] = json.loads(out.strip().splitlines()[-1])
    return versions


def _is_current(reqs: list[str]) -> bool:
    if not STAMP.exists():
        return False
    try:
        if json.loads(STAMP.read_text()).get("requirements") != reqs:
            return False
    except (OSError, ValueError):
        return False
    got = installed_versions()
    return (
        got.get("flwr") == FLWR_VERSION
        and got.get("ray") == RAY_VERSION
        and got.get("torch", "").split("+")[0] == TORCH_VERSION
        and "fedstack" in got
    )


def _pip(args: list[str], log: list[str]) -> None:
    cmd = [str(python()), "-m", "pip", "install", "--disable-pip-version-check", *args]
    log.append(" ".join(cmd))
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, timeout=INSTALL_TIMEOUT)


def _declared_requirements() -> list[str]:
    """flwr's own dependency lines (core + the ``simulation`` extra) from its metadata."""
    code = (
        "import json, re\nfrom importlib.metadata import requires\n"
        "out = []\n"
        "for r in requires('flwr') or []:\n"
        "    if 'extra ==' in r and \"extra == 'simulation'\" not in r:\n"
        "        continue\n"
        "    out.append(r.replace(\" and extra == 'simulation'\", '')"
        ".replace(\"; extra == 'simulation'\", ''))\n"
        "print(json.dumps(out))\n"
    )
    out = subprocess.run(
        [str(python()), "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    lines: list[str] = json.loads(out.strip().splitlines()[-1])
    return lines


def _install_relaxed(reqs: list[str], commands: list[str]) -> list[str]:
    """Install flwr with ``--no-deps``, then its declared deps with unavailable floors relaxed."""
    notes: list[str] = []
    _pip(["--no-deps", f"flwr=={FLWR_VERSION}"], commands)
    declared = []
    for line in _declared_requirements():
        if line.replace(" ", "").startswith("certifi>=2026.10.19"):
            notes.append(
                "flwr 1.42.0 requires certifi>=2026.10.19, which the package "
                "registry reachable here does not serve (newest: 2026.10.18); "
                "installed flwr with --no-deps and certifi>=2026.10.18 instead "
                "(a CA bundle one day older; irrelevant on insecure loopback)"
            )
            line = "certifi>=2026.10.18"
        declared.append(line)
    rest = [r for r in reqs if not r.startswith("flwr")]
    _pip([*declared, *rest], commands)
    return notes


def ensure_flower_venv(force: bool = False) -> dict[str, object]:
    """Create (or reuse) ``bench/.flower-venv`` with the pinned Flower stack.

    Args:
        force: Delete and rebuild the venv even if it is current.

    Returns:
        ``{"venv": path, "versions": {...}, "requirements": [...], "commands": [...]}``
        (``commands`` is empty when the venv was reused).

    Raises:
        subprocess.CalledProcessError: If an install step fails.
        subprocess.TimeoutExpired: If an install step takes longer than 30 minutes.
    """
    reqs = requirements()
    commands: list[str] = []
    notes: list[str] = []
    if force and VENV.exists():
        shutil.rmtree(VENV)
    if not _is_current(reqs):
        if not python().exists():
            commands.append(f"python -m venv {VENV}")
            venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        # torch first, by exact version, so nothing can resolve a CUDA build instead.
        _pip([f"torch=={TORCH_VERSION}"], commands)
        try:
            _pip(reqs, commands)
        except subprocess.CalledProcessError:
            # flwr 1.42.0 declares certifi>=2026.10.19, a release the registry reachable
            # here does not serve; install flwr itself without dependencies and then its
            # declared dependencies as published, relaxing only a floor nobody serves.
            notes.extend(_install_relaxed(reqs, commands))
        _pip(["--no-deps", "-e", str(REPO)], commands)
        STAMP.write_text(
            json.dumps({"requirements": reqs, "commands": commands, "notes": notes}, indent=2)
        )
    else:
        notes = list(json.loads(STAMP.read_text()).get("notes", []))
    versions = installed_versions()
    if versions.get("flwr") != FLWR_VERSION:
        raise RuntimeError(
            f"the Flower venv has flwr {versions.get('flwr')}, expected {FLWR_VERSION}"
        )
    return {
        "venv": str(VENV),
        "versions": versions,
        "requirements": reqs,
        "commands": commands,
        "notes": notes,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild the venv from scratch")
    args = ap.parse_args()
    info = ensure_flower_venv(force=args.force)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
