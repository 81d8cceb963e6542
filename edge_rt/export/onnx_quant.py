"""Block-wise weight quantization of an exported ONNX graph into ONNX Runtime's MatMulNBits.

Why not onnxruntime.quantization: the dense fp32 weights edge-rt exports from a GGUF are usually
already quantized (SmolLM2: every layer Q4_1, asymmetric 4-bit in blocks of 32 inputs; the tied
embedding / output projection Q8_0, symmetric 8-bit in blocks of 32). Re-quantizing them on
another grid (symmetric 4-bit, per-channel int8) with per-tensor int8 activations lost ~25% top-1
agreement. A block grid that contains the GGUF one reproduces the weights exactly, so each matrix
gets, in blocks of 32 inputs, the grid (4 bits, or up to the scheme's most bits) that reconstructs
it with the least error, fewer bits first:
    asymmetric  w = (q - zp) * scale, q in 0..2^bits-1, min/max: at 4 bits with a float zero
                point, which contains Q4_1 (scale = d, zp = -m / d); at 8 bits the zero point is
                rounded to uint8 (ORT's CPU kernel takes float zero points at 2 and 4 bits only)
    symmetric   w = (q - 2^(bits-1)) * scale, scale = max|w| / (2^(bits-1) - 1): contains Q8_0 at 8 bits
Most bits per scheme: 8da4w = 4-bit layers and an up-to-8-bit output projection (the head of a tied
model is the Q8_0 embedding; 4 bits there cost ~15% top-1 on SmolLM2); int8 = up to 8 bits
everywhere (Q4_1 layers stay at 4 bits: the 4-bit grid is exact for them, 8 bits would not be).
The manifest counts the matrices per grid (quantization.matrices).

How the grid reaches ONNX Runtime: its fast CPU kernel for MatMulNBits (accuracy_level 0: weights
dequantized block by block, fp32 products, so no activation is quantized) takes 4-bit codes with
the default zero point 8; float zero points and 8 bits run a slower path (one 576 x 1536 matrix,
one row: 130 us against 990 us with float zero points, 860 us at 8 bits,
scripts/bench_ort_matmulnbits.py; the SmolLM2 bundle decoded at 5 tok/s against 34 unquantized).
So every grid is rewritten exactly on that kernel (`fast_form`): a block w = (q - zp) s is
(q - 8) s + (8 - zp) s, i.e. symmetric codes plus a per-block offset; an 8-bit code q = 16 h + l is two 4-bit codes over the input repeated
twice, 16 s (h - 8) + s (l - 8) + (136 - zp) s. The offsets go through one small fp32 product of
the input's block sums ([K/32, N]; an input's block sums are shared by the matrices that read it).
On a model that was not quantized before, the same schemes are ordinary block-wise round-to-nearest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BLOCK = 32

# quant -> (most bits of the layers' MatMuls, of the output projection)
SCHEMES = {"8da4w": (4, 8), "int8": (8, 8)}


def _blocks(w: np.ndarray) -> np.ndarray:
    # w [K, N] -> [N, K/32, 32]: MatMulNBits stores B transposed, blocks along K
    K, N = w.shape
    return np.ascontiguousarray(w.T, dtype=np.float32).reshape(N, K // BLOCK, BLOCK)


def quant_asym(w: np.ndarray, bits: int):
    """w [K, N] -> (codes [N, K/32, 32] in 0..2^bits-1, scales [N, K/32, 1], zero points [N, K/32, 1])."""
    g = _blocks(w)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    s = ((hi - lo) / (2**bits - 1)).astype(np.float32)
    s[s == 0] = 1.0
    zp = (-lo / s).astype(np.float32)
    if bits == 8:  # ORT runs float zero points only at 2 and 4 bits: round them to uint8
        zp = np.clip(np.rint(zp), 0, 255).astype(np.uint8)
    return np.clip(np.rint(g / s + zp), 0, 2**bits - 1).astype(np.uint8), s, zp


def quant_sym(w: np.ndarray, bits: int):
    """w [K, N] -> (codes offset by 2^(bits-1), scales [N, K/32, 1], None)."""
    g = _blocks(w)
    half = 2 ** (bits - 1)
    s = (np.abs(g).max(-1, keepdims=True) / (half - 1)).astype(np.float32)
    s[s == 0] = 1.0
    return (np.clip(np.rint(g / s), 1 - half, half - 1) + half).astype(np.uint8), s, None


def _dequant(q, s, zp, bits: int) -> np.ndarray:
    return (q.astype(np.float32) - (2 ** (bits - 1) if zp is None else zp.astype(np.float32))) * s


def quantize_matrix(w: np.ndarray, max_bits: int):
    """The grid of at most `max_bits` bits that reconstructs w [K, N] with the least squared error.

    Returns (MatMulNBits B [N, K/32, 32*bits/8] uint8, scales [N*K/32], zero points or None, bits, grid).
    Candidates go from fewer to more bits, so a matrix that a 4-bit grid reproduces exactly (Q4_1)
    stays at 4 bits even where 8 are allowed.
    """
    g = _blocks(w)
    best = None
    for bits in sorted({4, max_bits}):
        for grid, fn in (("symmetric", quant_sym), ("asymmetric", quant_asym)):
            q, s, zp = fn(w, bits)
            err = float(np.square(_dequant(q, s, zp, bits) - g).sum())
            if best is None or err < best[0]:
                best = (err, q, s, zp, bits, grid)
    _, q, s, zp, bits, grid = best
    return q, s, zp, bits, grid


def fast_form(q: np.ndarray, s: np.ndarray, zp, bits: int):
    """A grid (quantize_matrix) as 4-bit codes with zero point 8 plus block offsets (module doc).

    Returns (B [N, K'/32, 16] uint8, two codes a byte, the first in the low nibble; scales [N*K'/32];
    offsets [K/32, N] fp32 or None where all are zero; repeat: K' = repeat * K, the input
    concatenated `repeat` times). Exact: sum over the repeats of (B - 8) * scale, plus the offset,
    is the grid's (q - zp) * s.
    """
    zpf = np.float32(2 ** (bits - 1)) if zp is None else zp.astype(np.float32)
    if bits == 4:
        codes, scales, offsets, repeat = q, s, (8 - zpf) * s, 1
    else:  # 8 bits: q = 16 h + l, h and l in 0..15
        codes = np.concatenate([q >> 4, q & 15], axis=1)
        scales, offsets, repeat = np.concatenate([16 * s, s], axis=1), (136 - zpf) * s, 2
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    offsets = np.ascontiguousarray(offsets[..., 0].T, dtype=np.float32)  # [K/32, N]
    return packed, scales.reshape(-1).astype(np.float32), (offsets if offsets.any() else None), repeat


def matmul_nodes(x: str, y: str, base: str, w: np.ndarray, max_bits: int, made: dict):
    """ONNX nodes and initializers computing y = x @ w on the fast MatMulNBits kernel.

    Args:
        x, y: input and output names; base: a unique name prefix.
        w: the [K, N] weight; max_bits: the most bits its grid may use (quantize_matrix).
        made: what earlier calls on the same graph made, shared so each is made once (filled
            here): ("sums", input name) -> its block sums' name, ("indicator", K) -> the [K, K/32]
            block indicator's name.
    Returns:
        (nodes, initializers, bits, grid).
    """
    from onnx import helper, numpy_helper

    K, N = w.shape
    q, s, zp, bits, grid = quantize_matrix(w, max_bits)
    packed, scales, offsets, repeat = fast_form(q, s, zp, bits)
    nodes, inits = [], [numpy_helper.from_array(packed, base + "_q"), numpy_helper.from_array(scales, base + "_scales")]
    src = x
    if repeat > 1:
        src = f"{base}_x{repeat}"
        nodes.append(helper.make_node("Concat", [x] * repeat, [src], name=src, axis=-1))
    main = y if offsets is None else base + "_main"
    nodes.append(helper.make_node("MatMulNBits", [src, base + "_q", base + "_scales"], [main], name=base,
                                  domain="com.microsoft", K=K * repeat, N=N, bits=4, block_size=BLOCK,
                                  accuracy_level=0))
    if offsets is not None:
        if ("indicator", K) not in made:  # x @ [K, K/32] indicator of the blocks: the block sums, any leading dims
            made["indicator", K] = f"blocksum_indicator_{K}"
            inits.append(numpy_helper.from_array(
                np.kron(np.eye(K // BLOCK, dtype=np.float32), np.ones((BLOCK, 1), dtype=np.float32)),
                made["indicator", K]))
        if ("sums", x) not in made:
            made["sums", x] = f"{base}_blocksums"
            nodes.append(helper.make_node("MatMul", [x, made["indicator", K]], [made["sums", x]], name=made["sums", x]))
        inits.append(numpy_helper.from_array(offsets, base + "_offsets"))
        nodes.append(helper.make_node("MatMul", [made["sums", x], base + "_offsets"], [base + "_off"],
                                      name=base + "_off"))
        nodes.append(helper.make_node("Add", [main, base + "_off"], [y], name=base + "_add"))
    return nodes, inits, bits, grid


def _weight_of(node, inits: dict, producers: dict):
    """The constant [K, N] weight of a MatMul (an initializer, or a Transpose of one), else None."""
    from onnx import numpy_helper

    name = node.input[1]
    if name in inits:
        return numpy_helper.to_array(inits[name])
    t = producers.get(name)
    if t is not None and t.op_type == "Transpose" and t.input[0] in inits:
        perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
        if perm in ([], [[1, 0]]):
            return numpy_helper.to_array(inits[t.input[0]]).T
    return None


def quantize_onnx_blockwise(src: Path, dst: Path, quant: str, vocab_size: int) -> dict:
    """Replace every MatMul by a constant 2-D weight with MatMulNBits; returns counts for the manifest."""
    import onnx
    from onnx import helper

    layer_bits, head_bits = SCHEMES[quant]
    model = onnx.load(str(src))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    new_nodes, new_inits, counts, made = [], [], {"layers": 0, "head": 0, "kept_fp32": 0}, {}
    weights = {id(n): _weight_of(n, inits, producers) for n in g.node if n.op_type == "MatMul"}
    # the output projection: the last MatMul by a [K, vocab] weight (a layer may be as wide as the vocabulary)
    head_id = max((k for k, n in enumerate(g.node) if weights.get(id(n)) is not None
                   and weights[id(n)].shape[-1] == vocab_size), default=None)
    for k, node in enumerate(g.node):
        w = weights.get(id(node))
        if w is None or w.ndim != 2 or w.shape[0] % BLOCK:
            counts["kept_fp32"] += w is not None
            new_nodes.append(node)
            continue
        head = k == head_id
        nodes, node_inits, bits, grid = matmul_nodes(node.input[0], node.output[0],
                                                     f"{node.name or node.output[0]}_nbits", w,
                                                     head_bits if head else layer_bits, made)
        new_nodes += nodes
        new_inits += node_inits
        counts["head" if head else "layers"] += 1
        counts[f"{bits}-bit {grid}"] = counts.get(f"{bits}-bit {grid}", 0) + 1
    used = {i for n in new_nodes for i in n.input}
    # drop Transposes and weights nothing reads any more (graph outputs are never weights here)
    while True:
        dead = [n for n in new_nodes if n.op_type == "Transpose" and all(o not in used for o in n.output)
                and n.input[0] in inits]
        if not dead:
            break
        new_nodes = [n for n in new_nodes if n not in dead]
        used = {i for n in new_nodes for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dst))
    return counts
