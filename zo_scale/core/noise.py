"""Counter-based noise: element i of a stream is a pure function of (seed, stream, i).

ZO never stores its perturbation z; it regenerates it. Regenerating it from a counter rather than
from a stateful generator is what makes a slice of z cheap and exact: ``normal(s, k, 0, n)[a:b]``
equals ``normal(s, k, a, b - a)`` bit for bit, so a ZeRO-3 rank can generate only the elements of
its own shard and still reproduce a one-process run, and CPU and CUDA give the same numbers.

Construction (one 64-bit hash per 4 normals or 64 signs):

    key      = mix64(mix64(seed) ^ stream)
    word[w]  = mix64(key + (w + 1) * GAMMA)                  # SplitMix64 over the word index w
    normal:  z[4w + j] = Q[int16 j of word[w] + 32768]        # Q: 65,536-level normal quantile table
    sign:    z[64w + 8b + j] = +1 if bit j of byte b of word[w] else -1

Q holds the normal quantiles at (k + 1/2) / 65536, rescaled to unit variance, so a draw is a
16-bit-resolution standard normal whose tails stop at 4.3 sigma. For ZO estimation only
E[z] = 0 and E[z z^T] = I matter; the table lookup is what makes generation faster than
``torch.randn`` on a CPU (see ``benchmarks/noise_throughput.py``).

Two forms compute the same numbers. :func:`generate` works in chunks of ``CHUNK`` elements, one hash
per word (the fast form for eager tensor ops, and a 262M-element tensor never needs a full-size
temporary). :func:`at` is the elementwise form, one hash per element, that a compiler fuses into the
kernel consuming z (:mod:`zo_scale.core.kernel`): z is never written to memory at all.
:func:`add_noise_` runs through the ZO sweep, so it takes whichever path the sweep takes.
"""

from __future__ import annotations

import functools

import torch

CHUNK = 1 << 16  # elements per generated chunk: the int64 words and the output stay in L2 cache

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
NORMALS_PER_WORD = 4
SIGNS_PER_WORD = 64


def _signed(x: int) -> int:
    """An unsigned 64-bit integer as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return x - (1 << 64) if x >= 1 << 63 else x


def mix64(x: int) -> int:
    """SplitMix64's finalizer on a Python int: a bijective 64-bit hash."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed hashed from integers, e.g. (run seed, step, query): distinct parts, independent seeds."""
    h = _GAMMA
    for p in parts:
        h = mix64(h ^ (p & _MASK64))
    return h >> 1


def stream_key(seed: int, stream: int) -> int:
    """The 64-bit key of one (seed, stream) pair, as a signed int64 value."""
    return _signed(mix64(mix64(seed) ^ (stream & _MASK64)))


def seed_key(seed: int) -> int:
    """mix64(seed) as a signed int64 value: the seed's half of :func:`stream_key`, for :func:`keys_of`."""
    return _signed(mix64(seed))


def keys_of(seed_part: int, streams: torch.Tensor) -> torch.Tensor:
    """:func:`stream_key` of one seed (``seed_part`` = :func:`seed_key` of it) and each int64 stream id,
    elementwise: equal to the Python form bit for bit (``tests/core/test_noise.py``)."""
    return _mix64_(streams ^ seed_part)


def _mix64_(w: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer in place on an int64 tensor.

    torch shifts int64 arithmetically, so each shift is masked to make it logical; products wrap
    modulo 2^64, which is exactly the unsigned arithmetic the hash wants.
    """
    w ^= (w >> 30) & ((1 << 34) - 1)
    w *= _signed(_MIX1)
    w ^= (w >> 27) & ((1 << 37) - 1)
    w *= _signed(_MIX2)
    w ^= (w >> 31) & ((1 << 33) - 1)
    return w


@functools.lru_cache(maxsize=16)
def _word_index(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64, device=device)


def hash64(x: torch.Tensor, key: int) -> torch.Tensor:
    """mix64(key + x * GAMMA) elementwise on an int64 tensor (a new tensor): SplitMix64's output for
    counter x under this key; also the sparse mask's per-element draw."""
    w = x * _signed(_GAMMA)
    w += key
    return _mix64_(w)


def _words(key: int, first: int, n: int, device: torch.device) -> torch.Tensor:
    """word[first : first + n] of the stream with this key, int64 of shape (n,)."""
    return hash64(_word_index(n, device) + (first + 1), key)


@functools.lru_cache(maxsize=32)
def _normal_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    k = torch.arange(65536, dtype=torch.float64)
    q = torch.special.ndtri((k + 0.5) / 65536)
    return (q / q.square().mean().sqrt()).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=32)
def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1  # (256 byte values, 8 bits)
    return (bits * 2 - 1).to(device=device, dtype=dtype)


def _chunk(kind: str, key: int, start: int, count: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Elements [start, start + count) of one stream, count <= CHUNK."""
    per_word = NORMALS_PER_WORD if kind == "normal" else SIGNS_PER_WORD
    first = start // per_word
    last = (start + count - 1) // per_word
    words = _words(key, first, last - first + 1, device)
    if kind == "normal":
        idx = words.view(torch.int16).to(torch.int32) + 32768  # 4 table indices per word
        z = torch.index_select(_normal_table(dtype, device), 0, idx)
    else:
        idx = words.view(torch.uint8).to(torch.int32)  # 8 bytes per word, 8 signs per byte
        z = torch.index_select(_sign_table(dtype, device), 0, idx).view(-1)
    skip = start - first * per_word
    return z[skip : skip + count]


KINDS = ("normal", "rademacher")


def table(kind: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The lookup table :func:`at` reads for this kind (the normal quantiles in ``dtype``); None for signs."""
    return _normal_table(dtype, device) if kind == "normal" else None


def at(kind: str, index: torch.Tensor, key: int, lookup: torch.Tensor | None) -> torch.Tensor:
    """z[index] of the stream with this key (:func:`stream_key`), elementwise, for an int64 ``index``.

    Equal bit for bit to :func:`generate` at the same indices (``tests/core/test_noise.py``). Written
    with constant shifts and masks only, so inductor vectorizes it (C++ SIMD on CPU, Triton on CUDA).
    ``lookup``: :func:`table` of the kind, in the dtype z is wanted in (normal); signs come out int64.
    """
    if kind == "normal":
        word = hash64((index >> 2) + 1, key)
        lane = index & 3  # int16 lane j of the word: bits [16j, 16j + 16), little-endian as in _chunk
        bits = torch.where(lane == 0, word, torch.where(lane == 1, word >> 16, torch.where(lane == 2, word >> 32,
                                                                                             word >> 48)))
        return lookup[(bits & 0xFFFF) ^ 0x8000]  # the int16 value + 32768, as in _chunk
    word = hash64((index >> 6) + 1, key)
    return ((word >> (index & 63)) & 1) * 2 - 1


def _check(kind: str, start: int, count: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {KINDS}")
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")


def generate(
    kind: str,
    seed: int,
    stream: int,
    start: int,
    count: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Elements [start, start + count) of the noise stream (seed, stream): a tensor of shape (count,)."""
    _check(kind, start, count)
    device = torch.device(device)
    key = stream_key(seed, stream)
    if 0 < count <= CHUNK:
        return _chunk(kind, key, start, count, dtype, device)
    out = torch.empty(count, dtype=dtype, device=device)
    for s in range(0, count, CHUNK):
        n = min(CHUNK, count - s)
        out[s : s + n] = _chunk(kind, key, start + s, n, dtype, device)
    return out


def normal(
    seed: int,
    stream: int,
    start: int,
    count: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Standard normals z[start : start + count) of stream (seed, stream), shape (count,)."""
    return generate("normal", seed, stream, start, count, dtype, device)


def rademacher(
    seed: int,
    stream: int,
    start: int,
    count: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Random signs (+1 / -1, each with probability 1/2), elements [start, start + count), shape (count,)."""
    return generate("rademacher", seed, stream, start, count, dtype, device)


def add_noise_(
    out: torch.Tensor, kind: str, seed: int, stream: int, start: int, alpha: float, kernel: str | None = None
) -> torch.Tensor:
    """out <- round(out + alpha * z[start : start + out.numel()]), computed in fp32, as one sweep.

    ``out`` must be a contiguous 1-D view (e.g. a flat parameter or one rank's shard of it). This is
    the ZO sweep with one move (:func:`zo_scale.core.sweep.sweep_shard`): a compiled kernel or the
    chunked eager reference, by ``kernel`` (:mod:`zo_scale.core.kernel`), with equal results.
    """
    from zo_scale.core.directions import DenseDirection  # the sweep builds on this module
    from zo_scale.core.shards import ParamShard
    from zo_scale.core.sweep import sweep_shard

    _check(kind, start, out.numel())
    shard = ParamShard(out, "", stream, out, start, torch.Size([start + out.numel()]))
    sweep_shard(shard, after=[(DenseDirection(seed, kind), alpha)], kernel_mode=kernel)
    return out
