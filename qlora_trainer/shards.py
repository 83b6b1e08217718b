"""safetensors files read by header and written tensor by tensor, for the streaming merge.

The safetensors library writes a file from a dict of tensors held in memory at once; a 70B merge cannot hold a
shard's worth. The format is simple (8-byte header length, JSON header with every tensor's dtype, shape and byte
offsets, then the raw little-endian bytes), so a shard whose layout is planned up front can be written one
tensor at a time.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qlora_trainer.base_model import by_file
from qlora_trainer.errors import ArgumentError, UserError

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parse_size(size: str | int) -> int:
    """'5GB', '500MB', '150KB', '2GiB' or a number of bytes -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", size.upper())
    if not match:
        raise ArgumentError("max_shard_size", f"{{arg}} {size!r}: use a size like 5GB, 500MB or 150KB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit or " "))


def header_entries(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every checkpoint tensor, from the safetensors headers (no tensor data is read)."""
    out = {}
    for file, keys in by_file(files).items():
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                present = set(f.keys())
                for key in keys:
                    if key not in present:
                        raise UserError(f"{file}: the index names tensor {key!r}, but this shard does not hold it")
                    view = f.get_slice(key)
                    dtype = view.get_dtype()
                    if dtype not in ST_DTYPES:
                        raise UserError(f"{file}: tensor {key!r} has dtype {dtype}, which we cannot merge")
                    out[key] = (tuple(view.get_shape()), ST_DTYPES[dtype])
        except (SafetensorError, OSError) as err:
            raise UserError(f"{file}: not a readable safetensors file ({err}): the download may be incomplete") \
                from None
    return out


class ShardWriter:
    """A safetensors file written in two steps: the header (all offsets known from the plan), then each tensor's
    bytes in order as it is produced. Only the tensor being written is ever in memory."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, shape, dtype in entries:  # (name, shape, dtype) in the order the tensors will be written
            nbytes = math.prod(shape) * itemsize(dtype)
            header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors itself writes it
        self.path, self.order, self.written = path, [key for key, _, _ in entries], 0
        self.size = 8 + len(raw) + offset
        self.file = open(path, "wb")
        self.file.write(len(raw).to_bytes(8, "little"))
        self.file.write(raw)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        assert key == self.order[self.written], (key, self.order[self.written])
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # little-endian, as on disk
        self.file.write(memoryview(data))
        self.written += 1

    def abort(self) -> None:
        """Close the file after a failure, without the completeness check (the caller removes it)."""
        self.file.close()

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.written != len(self.order) or self.path.stat().st_size != self.size:
            raise RuntimeError(f"{self.path}: incomplete shard ({self.written}/{len(self.order)} tensors)")


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"
