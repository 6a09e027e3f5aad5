"""Write-new-then-swap replacement of folders, and checks that a destination can be written before long work.

Every stemst overwrite (a zarr store, a table inside one, a saved model) goes through :func:`replacing`: the new
result is written to a sibling folder ``.NAME.stemst-new``; once complete it is renamed ``.NAME.stemst-ready``; the
old folder is renamed ``.NAME.stemst-old``, the ready one takes its place and the old one is deleted. Every step is
a rename within one folder, so at any moment a whole old or a whole new result exists. A run killed on the way
leaves one of these siblings; the next call (:func:`recover`) finishes or undoes the swap and warns naming them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stemst._errors import StemstDataError, warn

#: marks the sibling folders of a replacement; ``.NAME{TAG}{label}-new|ready|old``
TAG = ".stemst-"


@dataclass(frozen=True)
class Swap:
    """The folders of one replacement of ``final``.

    Attributes
    ----------
    final
        The folder being replaced.
    new, ready, old
        The new result while it is written, once it is complete, and the old result during the swap.
    inner
        Where the new result sits inside ``ready`` (``""``: ``ready`` itself); e.g. ``"tables/table"`` when a table
        is written as a store of its own and moved into another store.
    """

    final: Path
    new: Path
    ready: Path
    old: Path
    inner: str = ""

    @classmethod
    def of(cls, final: str | os.PathLike, *, anchor: str | os.PathLike | None = None, label: str = "") -> Swap:
        """Return the folders used to replace ``final``, placed beside ``anchor`` (default: ``final``), named after it.

        Examples
        --------
        >>> Swap.of("out/model").ready
        PosixPath('out/.model.stemst-ready')
        """
        final = Path(final)
        anchor = final if anchor is None else Path(anchor)
        stem = f".{anchor.name}{TAG}{label + '-' if label else ''}"
        inner = final.relative_to(anchor).as_posix() if anchor != final else ""
        paths = (anchor.with_name(stem + s) for s in ("new", "ready", "old"))
        return cls(final, *paths, inner=inner)

    @property
    def payload(self) -> Path:
        """The complete new result, inside :attr:`ready`."""
        return self.ready / self.inner

    def leftovers(self) -> list[Path]:
        """Folders of this replacement left by an interrupted run."""
        return [p for p in (self.new, self.ready, self.old) if p.exists()]


def _move(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; a source already moved (by another process recovering the same swap) is skipped."""
    try:
        os.replace(src, dst)
    except FileNotFoundError:
        if src.exists():
            raise


def recover(swap: Swap, *, after: Callable[[], None] | None = None) -> None:
    """Resolve what an interrupted replacement of ``swap.final`` left behind, warning naming it.

    If ``final`` is there, it is whole (it only ever appears by a rename of a complete folder): the leftovers are
    deleted. If it is missing, the complete new result (``ready``) or else the old one (``old``) is moved back into
    place. A half-written ``new`` is always deleted: the result it was becoming was never in place.

    Parameters
    ----------
    swap
        The replacement to check.
    after
        Called after anything was recovered (e.g. to consolidate a store's metadata again).
    """
    found = swap.leftovers()
    if not found:
        return
    restored = None
    if not swap.final.exists():
        for source in (swap.payload, swap.old):
            if source.exists():
                swap.final.parent.mkdir(parents=True, exist_ok=True)
                _move(source, swap.final)
                restored = source
                break
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    if after is not None:
        after()
    if restored:
        what = f"restored {swap.final} from {restored}"
    else:
        what = f"kept {swap.final}" if swap.final.exists() else f"nothing was at {swap.final} before"
    warn(
        f"Found the leftovers of an interrupted write of {swap.final}: {', '.join(str(p) for p in found)}. "
        f"Recovered: {what}, and deleted the leftovers. Check that {swap.final} holds the result you expect.",
        stacklevel=4,
    )


@contextmanager
def replacing(swap: Swap, *, overwrite: bool, after: Callable[[], None] | None = None) -> Iterator[Path]:
    """Write a new ``swap.final`` into the folder yielded; on success swap it in, on failure leave the old one.

    Parameters
    ----------
    swap
        The folders of the replacement (:meth:`Swap.of`).
    overwrite
        Allow replacing an existing ``final``; otherwise an existing one raises :class:`FileExistsError` first.
    after
        Called once the new result is in place, before the old one is deleted, and after a recovery.

    Yields
    ------
    The folder to write (``swap.new``; does not exist yet). Its :attr:`Swap.inner` part becomes ``final``.
    """
    recover(swap, after=after)
    if swap.final.exists() and not overwrite:
        raise FileExistsError(f"{swap.final} exists; pass overwrite=True to replace it.")
    check_destination(swap.final, what="the result")
    swap.new.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield swap.new
        if not (swap.new / swap.inner).exists():
            raise FileNotFoundError(f"Nothing was written to {swap.new / swap.inner}.")
        os.replace(swap.new, swap.ready)  # from here on the new result is whole
    except BaseException:
        shutil.rmtree(swap.new, ignore_errors=True)
        raise
    if swap.final.exists():
        os.replace(swap.final, swap.old)
    os.replace(swap.payload, swap.final)
    if after is not None:
        after()
    shutil.rmtree(swap.old, ignore_errors=True)
    shutil.rmtree(swap.ready, ignore_errors=True)


def check_destination(path: str | os.PathLike, *, what: str, argument: str | None = None) -> Path:
    """Check that a folder can be created (or replaced) at ``path``, before any long work that would write there.

    Parameters
    ----------
    path
        The folder to be written.
    what
        What it will hold, for the message (e.g. ``"the model"``).
    argument
        The argument that named it, for the message (e.g. ``"--out"``).

    Returns
    -------
    ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    StemstDataError
        If ``path`` is a file, lies under a file, or it or its nearest existing parent folder cannot be written.

    Examples
    --------
    >>> check_destination(Path(tempfile.gettempdir()) / "stemst-doc" / "model", what="the model").name
    'model'
    """
    path = Path(path).expanduser()
    name = f"{argument}={str(path)!r}" if argument else str(path)
    if path.exists() and not path.is_dir():
        raise StemstDataError(f"{name}: {path} is a file, not a folder; give a folder path for {what}.")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise StemstDataError(
            f"{name}: {parent} is a file, so no folder can be created under it for {what}; choose another path."
        )
    for folder in (parent, path) if path.is_dir() else (parent,):
        try:
            tempfile.TemporaryDirectory(prefix=".stemst-probe-", dir=folder).cleanup()
        except OSError as e:
            raise StemstDataError(
                f"{name}: cannot write in {folder} ({e.strerror or e}), so {what} could not be saved there; "
                "choose a writable folder."
            ) from e
    return path
