"""Is a volume file complete? Header-declared size against the data actually present.

SimpleITK reads a NIfTI, NRRD or MetaImage file whose data stops early (a broken download, a full
disk, an interrupted copy) and fills the missing voxels with zeros, silently: a CT cut at 50 %
becomes slices of constant 0 carrying organ labels. :func:`check_complete` reads the header of
these formats, works out how many bytes of voxel data it declares, and counts the bytes present
(decompressing gzip streams without keeping them); a short or broken file raises
:class:`IncompleteFileError` naming the file and what is missing. Formats it does not know pass.
"""
from __future__ import annotations

import gzip
import math
import re
import struct
import zlib
from pathlib import Path

from ..errors import UserError

_CHUNK = 1 << 20


class IncompleteFileError(UserError, ValueError):
    """A volume file with less data than its header declares, or a broken compressed stream."""


def check_complete(path: str | Path) -> None:
    """Raise :class:`IncompleteFileError` if the volume at ``path`` holds less data than it declares."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(path, name.endswith(".gz"))
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(path)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path)


def _truncated(path: Path, have: int, need: int, what: str = "voxel data") -> IncompleteFileError:
    pct = 100.0 * have / need if need else 0.0
    return IncompleteFileError(f"{path}: truncated file: {have:,} of {need:,} bytes of {what} present "
                               f"({pct:.0f}%); the missing voxels would read as zeros")


def _gunzip_length(path: Path, offset: int = 0) -> int:
    """Bytes in the gzip stream starting at ``offset`` of ``path`` (raises on a truncated or corrupt stream)."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
    total = 0
    with path.open("rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(_CHUNK):
            try:
                total += len(inflater.decompress(chunk))
                while inflater.unconsumed_tail:
                    total += len(inflater.decompress(inflater.unconsumed_tail))
            except zlib.error as err:
                raise IncompleteFileError(f"{path}: corrupt compressed data ({err})") from None
            if inflater.eof:
                break
    if not inflater.eof:
        raise IncompleteFileError(f"{path}: truncated file: the compressed stream ends early "
                                  f"(after {total:,} decompressed bytes)")
    return total


# --------------------------------------------------------------------------- NIfTI-1/2
def _check_nifti(path: Path, compressed: bool) -> None:
    try:
        if compressed:
            with gzip.open(path, "rb") as handle:
                head = handle.read(540)
        else:
            with path.open("rb") as handle:
                head = handle.read(540)
    except (OSError, EOFError) as err:
        raise IncompleteFileError(f"{path}: cannot read the NIfTI header ({err})") from None
    need = _nifti_bytes(path, head)
    if need is None:
        return
    have = _gunzip_length(path) if compressed else path.stat().st_size
    if have < need:
        raise _truncated(path, have, need, "header and voxel data")


def _nifti_bytes(path: Path, head: bytes) -> int | None:
    """vox_offset + voxels x bytes per voxel, from a NIfTI-1 or NIfTI-2 header (None: not NIfTI)."""
    if len(head) < 348:
        raise IncompleteFileError(f"{path}: truncated file: {len(head)} bytes, shorter than a NIfTI header")
    for endian in "<>":
        header_size = struct.unpack(endian + "i", head[:4])[0]
        if header_size == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if header_size == 540 and len(head) >= 540:
            dims = struct.unpack(endian + "8q", head[16:80])
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1:ndim + 1]):
        return None  # an unusual header: leave it to the reader
    return max(offset, header_size) + math.prod(dims[1:ndim + 1]) * bitpix // 8


# --------------------------------------------------------------------------- MetaImage
_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


def _read_text_header(path: Path, stop: re.Pattern[bytes], limit: int = 65536) -> tuple[list[str], int]:
    """Header lines up to and including the one matching ``stop`` -> (lines, byte offset after it)."""
    with path.open("rb") as handle:
        data = handle.read(limit)
    lines, pos = [], 0
    for raw in data.splitlines(keepends=True):
        pos += len(raw)
        lines.append(raw.decode("latin-1").strip())
        if stop.match(raw):
            return lines, pos
    return lines, -1


def _check_metaimage(path: Path) -> None:
    lines, pos = _read_text_header(path, re.compile(rb"\s*ElementDataFile\s*="))
    fields = {k.strip(): v.strip() for k, _, v in (line.partition("=") for line in lines if "=" in line)}
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        per_voxel = _MET_BYTES[fields["ElementType"]] * int(fields.get("ElementNumberOfChannels", "1"))
        data_file = fields["ElementDataFile"]
    except (KeyError, ValueError):
        return
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if data_file == "LOCAL":
        source, start = path, pos
    elif " " in data_file or data_file.upper() == "LIST":
        return  # a list of slice files: not checked here
    else:
        source, start = path.parent / data_file, 0
        if not source.is_file():
            raise IncompleteFileError(f"{path}: its data file {source} is missing")
    have = source.stat().st_size - start
    if compressed:
        declared = int(fields.get("CompressedDataSize", "0") or 0)
        if declared and have < declared:
            raise _truncated(path, have, declared, "compressed voxel data")
        return
    need = math.prod(dims) * per_voxel
    if have < need:
        raise _truncated(path, have, need)


# --------------------------------------------------------------------------- NRRD
_NRRD_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int",
                     "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64",
                     "uint64_t", "double"), 8),
}


def _check_nrrd(path: Path) -> None:
    lines, pos = _read_text_header(path, re.compile(rb"\s*\r?\n$"))
    fields = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            fields[key.strip().lower()] = value.lstrip("=").strip()
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
        per_voxel = _NRRD_BYTES.get(" ".join(fields["type"].lower().split()))
    except (KeyError, ValueError):
        return
    encoding = fields.get("encoding", "raw").lower()
    data_file = fields.get("data file") or fields.get("datafile")
    if per_voxel is None or encoding not in ("raw", "gzip", "gz"):
        return
    if data_file:
        if " " in data_file or data_file.upper().startswith("LIST"):
            return
        source, start = path.parent / data_file, 0
        if not source.is_file():
            raise IncompleteFileError(f"{path}: its data file {source} is missing")
    else:
        if pos < 0:
            return
        source, start = path, pos
    need = math.prod(sizes) * per_voxel
    have = _gunzip_length(source, start) if encoding != "raw" else source.stat().st_size - start
    if have < need:
        raise _truncated(path, have, need)
