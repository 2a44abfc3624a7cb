"""The FP8 forward's operand layouts on Hopper, and the key order that lets P stay in its registers.

FP8 wgmma (m64nNk32, e4m3) takes both shared-memory operands K-major and its A operand, from registers, in
the layout of CUTLASS's `ALayout_64x32`: thread t of the warpgroup (lane l, warp w) holds rows
16w + l/4 (+8), and in each register four consecutive k, 4(l%4) + 0..3 (+16 for registers 2 and 3). The
S = Q K^T accumulator it comes from (`CLayout_64xN`) gives the same thread columns 2(l%4) + 0..1 of every
8-column group instead. FlashAttention-3 moves bytes between registers and threads to match (byte_perm and
shuffles). attngen moves the keys instead: P.V sums over keys, so any order serves if V's rows follow it.
The thread packs its own four values of a k-quad, and the V^T operand is written with its keys in that
order (the transpose that FP8 needs anyway: V arrives [keys, dim], wgmma wants [dim, keys]).

Within each 16 keys, slot s = 4c + b of the A operand (c = l % 4, b the byte) carries key
KEY_OF_SLOT[s] = 8 (b / 2) + 2c + b % 2; slots 16..31 repeat that 16 keys on.
"""

from __future__ import annotations

FP8_K = 32                      # keys (or head-dim columns) per wgmma instruction at 8 bits
P_SCALE_LOG2 = 8                # P is packed as 2^8 P: [0, 256] keeps e4m3's precision (FA3's Max_offset)


def key_of_slot(slot: int) -> int:
    """The key (0..FP8_K-1, within its 32-key step) whose probability the A operand's k-slot `slot` carries."""
    half, s = divmod(slot, 16)
    c, b = divmod(s, 4)
    return 16 * half + 8 * (b // 2) + 2 * c + b % 2


KEY_OF_SLOT = tuple(key_of_slot(s) for s in range(FP8_K))
assert sorted(KEY_OF_SLOT) == list(range(FP8_K)), "a permutation of the step's keys"
