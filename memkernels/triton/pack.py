"""k-bit packing of uint8 codes in Triton: the layout of memkernels/reference.py.

Element ``i`` lives in group ``g = i // 8`` at slot ``j = i % 8``: bits ``[j*k, j*k + k)`` of the
little-endian word formed by bytes ``packed[g*k : g*k + k]``. A program handles ``BLOCK_GROUPS``
groups as a ``[BLOCK_GROUPS, 8]`` tile, so the 8 codes of a group are one row: packing is a
shift of each slot and an OR along the row, and a group's ``k`` bytes are stored one byte column
at a time.

The jit helpers ``pack_groups`` / ``unpack_groups`` are shared with the activation kernels, which
pack codes straight from registers; the host functions (pack_bits, unpack_bits and the activation
ops) are in memkernels/triton/activations.py.
"""
import triton
import triton.language as tl

# 128 groups = 1024 elements a program: large enough to keep a GPU's loads wide, small enough for
# the interpreter on CPU.
BLOCK_GROUPS = 128


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of Python ints, for the host code: triton.cdiv is a @triton.jit function, whose
    call from Python costs microseconds that a small tensor's launch pays several times."""
    return -(-a // b)


@triton.jit
def group_offsets(pid, BLOCK_GROUPS: tl.constexpr):
    """(groups [BLOCK_GROUPS] int64, elements [BLOCK_GROUPS, 8] int64) of program `pid`.

    int64 so that tensors of more than 2**31 elements index correctly.
    """
    groups = pid.to(tl.int64) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
    elements = groups[:, None] * 8 + tl.arange(0, 8)[None, :].to(tl.int64)
    return groups, elements


@triton.jit
def _or_slots(fields):
    """[N, 8] -> [N]: the OR of each row, as a tree of reshape + split.

    Not tl.sum/tl.reduce: tl.sum is a @triton.jit function of triton itself (the interpreter cannot
    call it if triton was imported without TRITON_INTERPRET) and a custom tl.reduce runs element
    by element there.
    """
    N: tl.constexpr = fields.shape[0]
    even, odd = tl.split(tl.reshape(fields, (N, 4, 2)))
    even, odd = tl.split(tl.reshape(even | odd, (N, 2, 2)))
    even, odd = tl.split(even | odd)
    return even | odd


@triton.jit
def _word_ptr(packed_ptr, BITS: tl.constexpr):
    # BITS in (1, 2, 4, 8): a group's bytes are one naturally aligned BITS-byte word.
    if BITS == 1:
        return packed_ptr
    elif BITS == 2:
        return packed_ptr.to(tl.pointer_type(tl.uint16))
    elif BITS == 4:
        return packed_ptr.to(tl.pointer_type(tl.uint32))
    else:
        return packed_ptr.to(tl.pointer_type(tl.uint64))


@triton.jit
def pack_groups(codes, packed_ptr, groups, group_mask, BITS: tl.constexpr):
    """Store codes [BLOCK_GROUPS, 8] (integers < 2**BITS) as BITS bytes a group.

    BITS != 3: one store of a BITS-byte word a group (packed_ptr must be 8-byte aligned).
    """
    WORD: tl.constexpr = tl.uint32 if BITS <= 4 else tl.uint64
    slot_shift = (tl.arange(0, 8) * BITS).to(WORD)
    # Masking keeps an out-of-range code from spilling into its neighbours' bits.
    fields = (codes.to(WORD) & ((1 << BITS) - 1)) << slot_shift[None, :]
    word = _or_slots(fields)
    if BITS == 3:
        for byte in tl.static_range(BITS):
            tl.store(packed_ptr + groups * BITS + byte, ((word >> (8 * byte)) & 0xFF).to(tl.uint8),
                     mask=group_mask)
    else:
        tl.store(_word_ptr(packed_ptr, BITS) + groups, word, mask=group_mask)  # store casts


@triton.jit
def unpack_groups(packed_ptr, groups, group_mask, BITS: tl.constexpr):
    """Codes [BLOCK_GROUPS, 8] int32 of the groups stored at `packed_ptr` (0 where masked).

    BITS != 3: one load of a BITS-byte word a group (packed_ptr must be 8-byte aligned).
    """
    WORD: tl.constexpr = tl.uint32 if BITS <= 4 else tl.uint64
    if BITS == 3:
        word = tl.full(groups.shape, 0, WORD)
        for byte in tl.static_range(BITS):
            b = tl.load(packed_ptr + groups * BITS + byte, mask=group_mask, other=0)
            word = word | (b.to(WORD) << (8 * byte))
    else:
        word = tl.load(_word_ptr(packed_ptr, BITS) + groups, mask=group_mask, other=0).to(WORD)
    slot_shift = (tl.arange(0, 8) * BITS).to(WORD)
    return ((word[:, None] >> slot_shift[None, :]) & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def pack_bits_kernel(codes_ptr, packed_ptr, numel, num_groups, BITS: tl.constexpr,
                     BLOCK_GROUPS: tl.constexpr):
    groups, elements = group_offsets(tl.program_id(0), BLOCK_GROUPS)
    codes = tl.load(codes_ptr + elements, mask=elements < numel, other=0)
    pack_groups(codes, packed_ptr, groups, groups < num_groups, BITS)


@triton.jit
def unpack_bits_kernel(packed_ptr, codes_ptr, numel, num_groups, BITS: tl.constexpr,
                       BLOCK_GROUPS: tl.constexpr):
    groups, elements = group_offsets(tl.program_id(0), BLOCK_GROUPS)
    codes = unpack_groups(packed_ptr, groups, groups < num_groups, BITS)
    tl.store(codes_ptr + elements, codes.to(tl.uint8), mask=elements < numel)
