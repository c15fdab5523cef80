r"""Safe output folders for ``clsemb report`` and ``clsemb compare``.

Rules (checked before any computation):

* ``--out`` that does not exist, or is empty: created.
* ``--out`` holding a previous clsemb output (a ``.clsemb-manifest.json`` listing the
  files a run wrote and their SHA-256): the files listed there are replaced; any other
  file in the folder is left alone.
* any other non-empty folder: refused, unless ``--overwrite`` is given; even then no
  file that clsemb did not write (or that was edited since) is replaced or deleted.
* ``--out`` that is a file, lies under a file, or cannot be written: refused.

A run writes into a temporary folder beside ``--out`` and moves the files into place at
the end, so an interrupted run leaves the previous output as it was. A lock file beside
``--out`` makes a second run on the same folder fail with a clear message while the
first one runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from captum_clsemb.cli.loading import CLIError

log = logging.getLogger("captum_clsemb")

MANIFEST = ".clsemb-manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(folder: Path) -> dict[str, set[str]] | None:
    """``{file name: SHA-256 digests}`` of a previous run's manifest; None when there is no valid one."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
        files = data["files"]
        if data.get("tool") != "clsemb" or not isinstance(files, dict):
            return None
        return {
            str(k): {str(v)} if isinstance(v, str) else {str(d) for d in v}
            for k, v in files.items()
            if "/" not in str(k) and str(k) not in ("", ".", "..")
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _owned(folder: Path, manifest: dict[str, set[str]]) -> set[str]:
    """Files of the manifest that are still exactly as a clsemb run wrote them."""
    owned = set()
    for name, digests in manifest.items():
        path = folder / name
        if path.is_file() and not path.is_symlink() and _sha256(path) in digests:
            owned.add(name)
    return owned


def _write_manifest(path: Path, command: str, files: dict) -> None:
    path.write_text(json.dumps({"tool": "clsemb", "command": command, "files": files}, indent=2) + "\n")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Lock:
    """An exclusive lock file (``fcntl.flock``; released when the process ends, even on a crash)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, out: Path) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): an exclusively created file
            fcntl = None  # type: ignore[assignment]
        for _ in range(10):
            try:
                flags = os.O_RDWR | os.O_CREAT | (os.O_EXCL if fcntl is None else 0)
                fd = os.open(self.path, flags, 0o644)
            except FileExistsError:
                raise CLIError(self._busy(out)) from None
            except OSError as e:
                raise CLIError(f"--out {out}: cannot write to {self.path.parent} ({e.strerror})") from e
            if fcntl is None:
                self.fd = fd
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise CLIError(self._busy(out)) from None
            # the previous holder may have removed the file between our open and flock
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                break
            os.close(fd)
        else:
            raise CLIError(self._busy(out))
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def _busy(self, out: Path) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        who = f" (process {pid})" if pid else ""
        return (
            f"another clsemb run{who} is writing to --out {out}; wait for it to finish or choose another "
            f"--out (lock file {self.path})"
        )

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked, so no other run holds a lock on a removed file
        os.close(self.fd)
        self.fd = None


class InterruptedAfterWriting(KeyboardInterrupt):
    """Ctrl-C arrived while the finished output was being moved into place: the new output is complete."""


@contextlib.contextmanager
def _deferred_interrupts() -> Iterator[None]:
    """Hold back Ctrl-C / SIGTERM for the few renames that put a finished output in place.

    A Ctrl-C held back is raised afterwards as :class:`InterruptedAfterWriting` (directly, not
    by re-sending the signal, which Python could deliver inside a finaliser and ignore); a
    SIGTERM is re-sent, so the process still ends as the sender asked.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.signal(sig, lambda s, f: received.append(s))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if signal.SIGTERM in received:
            os.kill(os.getpid(), signal.SIGTERM)
        if received:
            raise InterruptedAfterWriting()


class OutputDir:
    r"""An output folder that is written completely or not at all, and never loses a user's file.

    Use :meth:`open` before any computation (it checks ``out``, takes the lock and creates
    the temporary folder), write files into :attr:`tmp`, then :meth:`commit`; or use it as a
    context manager, which commits on success and removes the temporary folder on error.

    Args:
        out: the output folder.
        command: the clsemb command writing it (recorded in the manifest).
        planned: file names the run may write (checked up front against files already there).
        overwrite: allow writing into a non-empty folder that holds no previous clsemb output.
    """

    def __init__(
        self, out: str | Path, command: str, planned: Iterable[str] = (), overwrite: bool = False
    ) -> None:
        self.out = Path(out)
        self.command = command
        self.planned = set(planned)
        self.overwrite = overwrite
        self.tmp: Path | None = None
        self._lock = _Lock(self.out.parent / f".{self.out.name}.clsemb-lock")

    # -- before the run ---------------------------------------------------------------------

    def open(self) -> Path:
        """Check ``out``, lock it and create the temporary folder; return the temporary folder."""
        out = self.out
        if out.name in ("", ".", "..") or out.is_symlink():
            # work beside the real folder (renames stay on one file system, a link is never replaced)
            out = self.out = Path(os.path.realpath(out))
            self._lock = _Lock(out.parent / f".{out.name}.clsemb-lock")
        self._check_parents()
        if out.exists() and not out.is_dir():
            raise CLIError(f"--out {out} is a file, not a folder; choose a folder name")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CLIError(f"--out {out}: cannot create {out.parent} ({e.strerror})") from e
        self._lock.acquire(out)
        try:
            self._recover()
            self._check_contents()
            try:
                self.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.clsemb-tmp-", dir=out.parent))
                # it may become --out: the usual permissions, not mkdtemp's 0700
                self.tmp.chmod(0o777 & ~_umask())
            except OSError as e:
                raise CLIError(f"--out {out}: cannot write to {out.parent} ({e.strerror})") from e
        except BaseException:
            self._lock.release()
            raise
        return self.tmp

    def _check_parents(self) -> None:
        for parent in Path(os.path.abspath(self.out)).parents:
            if parent.exists():
                if not parent.is_dir():
                    raise CLIError(f"--out {self.out} lies under {parent}, which is a file, not a folder")
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise CLIError(f"--out {self.out}: {parent} is not writable")
                return

    def _recover(self) -> None:
        """Remove temporary folders of runs that were killed (we hold the lock: no other run is active)."""
        for leftover in self.out.parent.glob(f".{self.out.name}.clsemb-tmp-*"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)

    def _check_contents(self) -> None:
        out = self.out
        if not out.exists():
            return
        if not os.access(out, os.W_OK | os.X_OK):
            raise CLIError(f"--out {out} is not writable")
        present = {p.name for p in out.iterdir()}
        manifest = _read_manifest(out)
        if manifest is None:
            if not present:
                return
            clash = sorted(present & self.planned)
            if clash:
                raise CLIError(
                    f"--out {out} already holds {', '.join(clash)}, which clsemb did not write; move "
                    f"{'it' if len(clash) == 1 else 'them'} away or choose another --out (--overwrite only "
                    "replaces files written by an earlier clsemb run)"
                )
            if not self.overwrite:
                raise CLIError(
                    f"--out {out} is not empty and holds no earlier clsemb output; choose another --out, or pass "
                    "--overwrite to write there anyway (files clsemb did not write are never replaced or deleted)"
                )
            return
        owned = _owned(out, manifest) | {MANIFEST}
        changed = sorted((present & self.planned) - owned)
        if changed:
            raise CLIError(
                f"--out {out}: {', '.join(changed)} changed since the earlier clsemb run wrote "
                f"{'it' if len(changed) == 1 else 'them'} there; move {'it' if len(changed) == 1 else 'them'} away "
                "or choose another --out (--overwrite only replaces unchanged files of an earlier run)"
            )

    # -- after the run ------------------------------------------------------------------------

    def commit(self) -> None:
        """Move the finished output into place (previous clsemb files are replaced) and unlock."""
        assert self.tmp is not None, "open() first"
        tmp = self.tmp
        try:
            digests = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.name != MANIFEST}
            _write_manifest(tmp / MANIFEST, self.command, digests)
            with _deferred_interrupts():
                self._move_into_place(digests)
        except OSError as e:
            kept = self._keep(tmp) if tmp.exists() else None
            where = f"; what was not moved yet is in {kept}" if kept else ""
            raise CLIError(f"could not move the output into --out {self.out} ({e}){where}") from e
        finally:
            self.tmp = None
            self._lock.release()

    def _move_into_place(self, digests: dict[str, str]) -> None:
        out, tmp = self.out, self.tmp
        assert tmp is not None
        names = list(digests)
        if not out.exists():
            os.rename(tmp, out)
            return
        old = _read_manifest(out)
        owned = (_owned(out, old) | {MANIFEST}) if old is not None else set()
        foreign = {p.name for p in out.iterdir()} - owned
        clash = sorted(foreign & {*names, MANIFEST})
        if clash:  # a file appeared while the run was computing: keep the new output elsewhere
            kept = self._keep(tmp)
            raise CLIError(
                f"--out {out}: {', '.join(clash)} appeared there during the run and clsemb does not replace files "
                f"it did not write; the new output is in {kept}"
            )
        # the folder stays (its permissions, other files, a shell inside it): each file is replaced
        # atomically, within a few milliseconds with interrupts held back. Until the final manifest
        # is in place an interim one accepts the old and the new version of every file, so that a
        # run killed right here leaves files that a later run still recognises as its own.
        prev = old or {}
        interim = {n: sorted(prev.get(n, set()) | {d}) if n in owned else [d] for n, d in digests.items()}
        interim.update({n: sorted(prev[n]) for n in owned - {MANIFEST} - set(names)})
        _write_manifest(tmp / ".interim", self.command, interim)
        os.replace(tmp / ".interim", out / MANIFEST)
        for name in names:
            os.replace(tmp / name, out / name)
        for name in sorted((owned - {MANIFEST}) - set(names)):
            (out / name).unlink()  # a file of the earlier run that this run does not produce
        os.replace(tmp / MANIFEST, out / MANIFEST)
        shutil.rmtree(tmp, ignore_errors=True)

    def _keep(self, tmp: Path) -> Path | None:
        """Give the temporary folder a visible name beside ``out`` (later runs remove hidden ones)."""
        try:
            kept = Path(tempfile.mkdtemp(prefix=f"{self.out.name}-new-", dir=self.out.parent))
            kept.rmdir()
            os.rename(tmp, kept)
            return kept
        except OSError:
            return tmp

    def discard(self) -> None:
        """Remove the temporary folder and unlock (the run failed or was interrupted)."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        self._lock.release()

    def __enter__(self) -> Path:
        return self.tmp if self.tmp is not None else self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
