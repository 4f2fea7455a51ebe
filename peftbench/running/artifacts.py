"""Where trial artifacts go: a local folder or any fsspec URL (``s3://...`` once its filesystem
package, e.g. ``s3fs``, is installed)."""

from __future__ import annotations

import shutil
from pathlib import Path

from peftbench.errors import ConfigError


def _protocol(location: str) -> str | None:
    """The URL scheme of ``location`` (None for a plain path; ``file://`` counts as a path)."""
    if "://" not in location:
        return None
    scheme = location.split("://", 1)[0].lower()
    return None if scheme in ("file", "local") else scheme


def is_remote(location: str | None) -> bool:
    return bool(location) and _protocol(location) is not None


def local_path(location: str) -> Path:
    """A plain or ``file://`` location as an absolute path."""
    if "://" in location:
        location = location.split("://", 1)[1]
    return Path(location).expanduser().absolute()


def check_artifacts_dir(location: str) -> str:
    """The artifacts root, checked: an absolute path, or an fsspec URL whose filesystem is installed."""
    if not is_remote(location):
        return str(local_path(location))
    import fsspec

    try:
        fsspec.get_filesystem_class(_protocol(location))
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"--artifacts-dir {location}: fsspec cannot write there ({exc}); install the filesystem "
                          f"package for {_protocol(location)}:// (e.g. s3fs for s3://, gcsfs for gs://) "
                          f"or give a local folder") from None
    return location.rstrip("/")


def _fs(location: str):
    from fsspec.core import url_to_fs

    return url_to_fs(location)


def clear_artifacts(location: str) -> None:
    """Remove what a killed or failed attempt left at ``location``."""
    if is_remote(location):
        fs, path = _fs(location)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    else:
        directory = local_path(location)
        if directory.exists():
            shutil.rmtree(directory)


def upload(directory: Path, location: str) -> None:
    """Copy the files under ``directory`` to the URL ``location`` (same relative names)."""
    fs, root = _fs(location)
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        target = f"{root.rstrip('/')}/{file.relative_to(directory).as_posix()}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(file), target)


def write_text(location: str, name: str, text: str) -> None:
    """Write ``location/name`` (a folder or a URL)."""
    if is_remote(location):
        fs, root = _fs(location)
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root.rstrip('/')}/{name}", "w") as f:
            f.write(text)
    else:
        directory = local_path(location)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
