"""Writing and reading run files so that a crash or a full disk never leaves a half-written file under its final name."""

import errno
import json
import os
import secrets
import sys
from contextlib import contextmanager, suppress
from pathlib import Path

from safetensors import SafetensorError

from restune_sd.errors import UserError


def warn(message: str) -> None:
    """A warning line on stderr, where it never mixes with a command's JSON on stdout."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def write_reason(error: BaseException) -> str:
    """Why a write failed, in words; torch's zip writer reports a full disk as a RuntimeError."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "no space left on device"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if "unexpected pos" in text or "failed writing" in text:
        return f"the disk is probably full: {text}"
    return text


@contextmanager
def writing(what, hint: str = ""):
    """Turn a failed write (full disk, read-only or missing folder) into one line naming `what` and what to do."""
    try:
        yield
    except (OSError, SafetensorError) as error:  # safetensors reports a failed write as its own error
        raise UserError(f"cannot write {what} ({write_reason(error)}){'; ' + hint if hint else ''}") from None


def staging_folder(final) -> Path:
    """A new empty hidden sibling of the folder `final`, to fill and then rename into place. Made with os.mkdir, so it
    has the umask's permissions as `final` would (tempfile.mkdtemp makes every folder 0700)."""
    final = Path(final)
    while True:
        staging = final.with_name(f".{final.name}.{secrets.token_hex(4)}")
        try:
            staging.mkdir()
            return staging
        except FileExistsError:  # another staging folder drew the same name: draw again
            continue


def write_atomic(path, write, hint: str = "") -> Path:
    """Call `write(temporary_path)`, then rename it to `path`; on failure the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as error:
        remove_quietly(tmp)
        raise UserError(f"cannot write {path} ({write_reason(error)}){'; ' + hint if hint else ''}") from None
    except BaseException:
        remove_quietly(tmp)
        raise
    return path


def remove_quietly(path) -> None:
    """Remove a temporary file if it is there; where that fails too (a read-only file system), the first error counts."""
    with suppress(OSError):
        Path(path).unlink(missing_ok=True)


def write_text_atomic(path, text: str, hint: str = "") -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text), hint)


def read_reason(error: OSError) -> str:
    return (error.strerror or type(error).__name__).lower()


def readable_file(path, what: str, fix: str) -> Path:
    """`path` if it is a regular file; else a UserError saying it does not exist or what it is instead. A folder, a
    device (/dev/zero) or a pipe passed as a file would otherwise be read without end or with a traceback."""
    path = Path(path)
    try:
        is_file = path.is_file()
    except OSError as error:
        raise UserError(f"cannot read {what} {path} ({read_reason(error)}): {fix}") from None
    if not is_file:
        kind = "does not exist" if not path.exists() else "is a folder" if path.is_dir() else "is not a regular file"
        raise UserError(f"{what} {path} {kind}: {fix}")
    return path


def read_bytes(path, what: str, fix: str) -> bytes:
    """A regular file's bytes; a missing or unreadable one (permission, I/O error) is one line naming it and `fix`."""
    path = readable_file(path, what, fix)
    try:
        return path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {what} {path} ({read_reason(error)}): {fix}") from None


def read_text(path, what: str, fix: str, encoding: str = "utf-8", errors: str = "strict") -> str:
    """A regular file's text, as `read_bytes`; text that is not `encoding` is one line giving the byte."""
    data = read_bytes(path, what, fix)
    try:
        return data.decode(encoding, errors)
    except UnicodeDecodeError as error:
        raise UserError(f"{what} {path} is not {encoding.upper()} text (byte {error.start}): {fix}") from None


def read_json(path, fix: str):
    """A JSON file's contents; a damaged one is a UserError naming it and `fix`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = read_reason(error) if isinstance(error, OSError) else str(error).splitlines()[0]
        raise UserError(f"{path} is damaged ({reason}): {fix}") from None
