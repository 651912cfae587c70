"""The files agentkd ships, prompts/ and students/, found from any working directory.

In a source checkout they are the repository's top-level folders (where users read and edit them). A
wheel carries them inside the package as agentkd/prompts and agentkd/student_specs (pyproject.toml maps
the folders there as package data). A relative `prompts/...` or `students/...` path in a config that is
not found from the working directory is looked up in the shipped folder, so `student.spec =
"students/tiny.toml"` works outside the checkout; a file of the user's own at that path always wins.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CHECKOUT = PACKAGE.parent
# top-level folder name (as configs write it) -> its folder inside an installed package
SHIPPED = {"prompts": "prompts", "students": "student_specs"}


def shipped_dir(name: str) -> Path:
    """The shipped folder `name` ("prompts" | "students"): the checkout's, else the installed package's."""
    in_checkout = CHECKOUT / name
    if (CHECKOUT / "pyproject.toml").is_file() and in_checkout.is_dir():
        return in_checkout
    return PACKAGE / SHIPPED[name]


def resolve_shipped(value: str | Path) -> Path:
    """`value` as given when it exists from the working directory (or is absolute); else, for a relative
    path under a shipped folder's name, the shipped copy when it exists; else `value` unchanged, so the
    caller's not-found error names what the user wrote."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or not path.parts or path.parts[0] not in SHIPPED:
        return path
    candidate = shipped_dir(path.parts[0]).joinpath(*path.parts[1:])
    return candidate if candidate.exists() else path
