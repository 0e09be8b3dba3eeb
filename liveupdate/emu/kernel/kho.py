"""KHO images: what the old kernel hands to the new one across a kexec.

The kernel's Kexec HandOver passes a flattened device tree; so does this one.
An image is a small header -- magic ``LUVMMKHO``, format version, CRC-32 and
length of the tree -- followed by a standard FDT blob (version 17, big
endian, with a memory reservation map and strings block), so ``dtc -I dtb``
can print it.  Nested dicts become nodes; property values carry a one-byte
type tag (``s`` string, ``u`` u64, ``b`` bytes) so the new kernel reads back
exactly what the old one wrote.  Lists become nodes whose children are named
by index.  :func:`decode_image` checks everything and raises
:class:`KhoError` with a message: a corrupt or truncated image is refused,
never half-used.
"""

from __future__ import annotations

import struct
import zlib

MAGIC = b"LUVMMKHO"
VERSION = 1
_HEADER = struct.Struct("<8sIII")  # magic, version, crc32, length of the FDT

FDT_MAGIC = 0xD00DFEED
FDT_BEGIN_NODE = 1
FDT_END_NODE = 2
FDT_PROP = 3
FDT_NOP = 4
FDT_END = 9
_FDT_HEADER = struct.Struct(">10I")
MAX_DEPTH = 32


class KhoError(ValueError):
    """A KHO image that cannot be trusted."""


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


class _Writer:
    def __init__(self):
        self.struct = bytearray()
        self.strings = bytearray()
        self.offsets: dict[str, int] = {}

    def name_offset(self, name: str) -> int:
        if name not in self.offsets:
            self.offsets[name] = len(self.strings)
            self.strings += name.encode() + b"\0"
        return self.offsets[name]

    def node(self, name: str, value: dict | list, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise KhoError("tree too deep")
        self.struct += struct.pack(">I", FDT_BEGIN_NODE) + _pad4(name.encode() + b"\0")
        if isinstance(value, list):
            self.prop("#list", len(value))
            items = [(str(i), v) for i, v in enumerate(value)]
        else:
            items = list(value.items())
        for key, v in items:
            if isinstance(v, (dict, list)):
                continue
            self.prop(key, v)
        for key, v in items:
            if isinstance(v, (dict, list)):
                self.node(key, v, depth + 1)
        self.struct += struct.pack(">I", FDT_END_NODE)

    def prop(self, key: str, v) -> None:
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, int):
            raw = b"u" + struct.pack(">Q", v & 0xFFFFFFFFFFFFFFFF)
        elif isinstance(v, str):
            raw = b"s" + v.encode()
        elif isinstance(v, (bytes, bytearray, memoryview)):
            raw = b"b" + bytes(v)
        else:
            raise TypeError(f"KHO cannot carry {type(v).__name__} ({key})")
        self.struct += struct.pack(">III", FDT_PROP, len(raw), self.name_offset(key)) + _pad4(raw)


def encode_fdt(tree: dict) -> bytes:
    w = _Writer()
    w.node("", tree)
    w.struct += struct.pack(">I", FDT_END)
    rsvmap = bytes(16)
    off_rsv = _FDT_HEADER.size
    off_struct = off_rsv + len(rsvmap)
    off_strings = off_struct + len(w.struct)
    total = off_strings + len(w.strings)
    header = _FDT_HEADER.pack(FDT_MAGIC, total, off_struct, off_strings, off_rsv, 17, 16, 0,
                              len(w.strings), len(w.struct))
    return header + rsvmap + bytes(w.struct) + bytes(w.strings)


def decode_fdt(blob: bytes) -> dict:
    if len(blob) < _FDT_HEADER.size:
        raise KhoError("FDT shorter than its header")
    (magic, total, off_struct, off_strings, off_rsv, version, last_comp, _, size_strings,
     size_struct) = _FDT_HEADER.unpack_from(blob)
    if magic != FDT_MAGIC:
        raise KhoError(f"bad FDT magic {magic:#x}")
    if version < 17 or last_comp > 17:
        raise KhoError(f"unsupported FDT version {version}")
    if total != len(blob) or off_struct + size_struct > total or off_strings + size_strings > total:
        raise KhoError("FDT blocks lie outside the blob")
    structure = blob[off_struct:off_struct + size_struct]
    strings = blob[off_strings:off_strings + size_strings]
    pos = 0

    def u32() -> int:
        nonlocal pos
        if pos + 4 > len(structure):
            raise KhoError("FDT structure block ends early")
        (v,) = struct.unpack_from(">I", structure, pos)
        pos += 4
        return v

    def name_at(off: int) -> str:
        if off >= len(strings):
            raise KhoError("property name outside the strings block")
        end = strings.find(b"\0", off)
        if end < 0:
            raise KhoError("unterminated property name")
        return strings[off:end].decode(errors="strict")

    def read_node(depth: int) -> tuple[str, dict | list]:
        nonlocal pos
        if depth > MAX_DEPTH:
            raise KhoError("FDT nested too deep")
        end = structure.find(b"\0", pos)
        if end < 0:
            raise KhoError("unterminated node name")
        name = structure[pos:end].decode()
        pos = (end + 1 + 3) & ~3
        node: dict = {}
        while True:
            token = u32()
            if token == FDT_NOP:
                continue
            if token == FDT_PROP:
                length, nameoff = u32(), u32()
                if pos + length > len(structure) or length < 1:
                    raise KhoError("property value outside the structure block")
                raw = structure[pos:pos + length]
                pos = (pos + length + 3) & ~3
                node[name_at(nameoff)] = _decode_value(raw)
            elif token == FDT_BEGIN_NODE:
                child, value = read_node(depth + 1)
                node[child] = value
            elif token == FDT_END_NODE:
                break
            else:
                raise KhoError(f"unexpected FDT token {token}")
        if "#list" in node:
            count = node.pop("#list")
            if not isinstance(count, int) or set(node) != {str(i) for i in range(count)}:
                raise KhoError(f"malformed list node {name!r}")
            return name, [node[str(i)] for i in range(count)]
        return name, node

    try:
        if u32() != FDT_BEGIN_NODE:
            raise KhoError("FDT does not start with a node")
        _, root = read_node(0)
        if u32() != FDT_END:
            raise KhoError("FDT has no end token")
    except UnicodeDecodeError as e:
        raise KhoError(f"FDT text is not UTF-8: {e}") from None
    if not isinstance(root, dict):
        raise KhoError("FDT root is not a node")
    return root


def _decode_value(raw: bytes):
    tag, body = raw[:1], raw[1:]
    if tag == b"u":
        if len(body) != 8:
            raise KhoError("u64 property of the wrong length")
        return struct.unpack(">Q", body)[0]
    if tag == b"s":
        return body.decode()
    if tag == b"b":
        return bytes(body)
    raise KhoError(f"unknown property type {tag!r}")


def encode_image(tree: dict) -> bytes:
    fdt = encode_fdt(tree)
    return _HEADER.pack(MAGIC, VERSION, zlib.crc32(fdt), len(fdt)) + fdt


def decode_image(image: bytes) -> dict:
    if len(image) < _HEADER.size:
        raise KhoError(f"KHO image of {len(image)} bytes is shorter than its header")
    magic, version, crc, length = _HEADER.unpack_from(image)
    if magic != MAGIC:
        raise KhoError("not a KHO image (bad magic)")
    if version != VERSION:
        raise KhoError(f"KHO image version {version}; this kernel reads version {VERSION}")
    fdt = image[_HEADER.size:]
    if len(fdt) != length:
        raise KhoError(f"KHO image truncated: {len(fdt)} of {length} bytes")
    if zlib.crc32(fdt) != crc:
        raise KhoError("KHO image checksum mismatch")
    return decode_fdt(fdt)
