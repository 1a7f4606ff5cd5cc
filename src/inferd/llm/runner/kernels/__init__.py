"""Native CPU kernels, loaded with ctypes.

The package is built with one library per instruction-set level (``variants.py``, built by
setup.py: a wheel, ``pip install`` or ``make install`` compiles them; nothing is compiled at serve
time, and the serving machine needs no compiler), and ``native_ops`` loads the best one this CPU
can execute. Without one (a source tree that was never built, a build made without a compiler, a
library that does not load) the runner keeps its pure-torch paths and says so once, at WARNING.
"""

from __future__ import annotations

import ctypes
import logging
from functools import cache
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import torch

from inferd.llm.runner.kernels import variants

log = logging.getLogger("inferd.llm.kernels")
_HERE = Path(__file__).parent
_P, _I, _I64, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
# How to get the libraries, said with every warning about their absence.
_HOW_TO_BUILD = (
    "they are built with the package: reinstall it where a C compiler is present "
    "(`pip install --force-reinstall .` from the source, or `make install`)"
)


class LayerWeights(ctypes.Structure):
    """One decoder layer for ``decoder_layers_bf16`` (the layer_weights struct of decoder_step.c)."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("input_norm", "post_norm", "qkv", "o", "gate_up", "down")),
        *((name, ctypes.c_void_p) for name in ("qkv_bias", "o_bias", "k_cache", "v_cache")),
        ("window", ctypes.c_int64),
        # float32 per-column scales of int8 weights (linear_int8); None: that matrix is bf16
        *((name, ctypes.c_void_p) for name in ("qkv_scale", "o_scale", "gate_up_scale", "down_scale")),
        ("kv_scales", ctypes.c_void_p),  # an int8 KV cache's scales (kv_scale_cache); None: bf16 caches
    ]


class KernelArgumentError(ValueError):
    """A tensor handed to a native kernel is not what it reads or writes (dtype, shape, layout):
    refused before the call, which would read or write out of bounds instead of failing."""


def _check(tensor: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple) -> None:
    """``tensor`` on the CPU, of ``dtype``, with ``shape`` (None: any size there), unit column
    stride and rows that do not overlap: what the kernels index it as."""
    if (
        tensor.dtype != dtype
        or tensor.device.type != "cpu"
        or tensor.dim() != len(shape)
        or any(want is not None and got != want for got, want in zip(tensor.shape, shape))
        or (tensor.dim() and tensor.stride(-1) != 1)
        or (tensor.dim() == 2 and tensor.stride(0) < tensor.shape[1])
    ):
        raise KernelArgumentError(
            f"{name}: the kernel takes a CPU {dtype} tensor of shape {shape} with unit column stride, "
            f"got {tensor.dtype} {tuple(tensor.shape)} strides {tensor.stride()} on {tensor.device}"
        )


class NativeOps:
    """The loaded library: the paged decode-attention kernel (fp32 or bf16 caches), the fused bf16
    element-wise steps of a decoder layer and, on CPUs with AMX or AVX512-BF16, bf16 linear layers
    (``has_linear``) and a whole decoder step in one call; thin wrappers over tensors."""

    def __init__(self, library: ctypes.CDLL, variant: str, path: Path | None = None) -> None:
        self.variant = variant  # which build: a variants.py name
        self.library = path  # the build's file (its stamp keys what was measured on it)
        self._checked_slots: torch.Tensor | None = None  # the last slot tensor found in range
        self.paged_decode = _bind(
            library.paged_decode_attention,
            *(_P, _I, _I64),  # q, q_bf16, q_stride
            *(_P, _P, _I, _I),  # k_cache, v_cache, is_bf16, k_packed (see packs_keys)
            *(_P, _I, _P),  # block_tables, table_width, ctx_lens
            *(_I, _I, _I, _I, _I),  # num_seqs, num_heads, num_kv_heads, head_dim, block_size
            *(_F, _I, _F),  # scale, window, softcap
            *(_P, _I, _I64),  # out, out_bf16, out_stride
            _P,  # kv_scales: the caches hold int8 (kv_scale_cache), or None
        )
        self._add_rms_norm = _bind(library.add_rms_norm_bf16, _P, _P, _P, _F, _I, _I, _P, restype=None)
        self._silu_mul = _bind(library.silu_mul_bf16, _P, _I, _I, _P, restype=None)
        # x, x_stride, rows, K, packed weight, N, bias, out, out_stride, out_fp32
        self._linear = _bind(library.linear_bf16, _P, _I64, _I, _I, _P, _I, _P, _P, _I64, _I, restype=None)
        self._argmax = _bind(library.argmax_rows_f32, _P, _I64, _I, _I, _P, restype=None)
        # q, k, v, stride, bounds, items, heads, head_dim, scale, out, out_stride
        self._varlen_attention = _bind(
            library.varlen_attention_f32, _P, _P, _P, _I64, _P, _I, _I, _I, _F, _P, _I64
        )
        self._has_varlen_attention = bool(_bind(library.varlen_attention_available)())
        # Linux grants AMX tile state per process on request; a kernel built without AMX says no.
        self.amx = torch.cpu._is_amx_tile_supported() and bool(library.amx_init())
        # bf16 linear layers through linear_bf16: AMX tiles where granted, else AVX512-BF16 (when
        # the build has it: only the amx and avx512bf16 builds, or -march=native on such a CPU).
        self._select_linear = _bind(library.linear_bf16_select, _I)
        self.has_linear = bool(self._select_linear(int(self.amx)))
        self._amx_selected = self.amx  # which kernel linear_bf16 runs (use_linear_kernel)
        # x, x_stride, rows, K, packed int8 weight, scales, N, bias, out, out_stride, out_fp32
        self._linear_int8 = _bind(library.linear_int8, _P, _I64, _I, _I, _P, _P, _I, _P, _P, _I64, _I)
        self.has_int8_linear = bool(library.linear_int8_available())
        # x, x_stride, rows, K, packed gate_up weight, scales or NULL, width, out, out_stride
        self._linear_gated = _bind(library.linear_gated, _P, _I64, _I, _I, _P, _P, _I, _P, _I64)
        self._rope_and_cache = _bind(
            library.rope_and_cache_bf16, _P, _I, _I, _I, _I, _I, _P, _P, _P, _I, _P, _P, _P, restype=None
        )
        self._packed_keys_take = _bind(library.packed_keys_take, _I, _I)
        self._decoder_layers = _bind(
            library.decoder_layers_bf16,
            *(_P, _I, _P, _P, _I),  # layers, num_layers, hidden, delta, has_delta
            *(_I, _I, _I, _I, _I, _I),  # tokens, hidden_size, intermediate, heads, kv heads, head_dim
            *(_F, _F, _P, _P, _P),  # eps, scale, cos, sin, slots
            *(_P, _I, _P, _I, _I),  # tables, table_width, ctx_lens, block_size, k_packed
        )

    def add_rms_norm(
        self, residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ):
        """residual += delta (in place, when given), then RMSNorm(residual) * weight as a new tensor."""
        _check(residual, "residual", torch.bfloat16, (None, None))
        rows, dim = residual.shape
        if not residual.is_contiguous() or (delta is not None and not delta.is_contiguous()):
            raise KernelArgumentError("residual and delta: the kernel takes contiguous rows")
        if delta is not None:
            _check(delta, "delta", torch.bfloat16, (rows, dim))
        _check(weight, "weight", torch.bfloat16, (dim,))
        out = torch.empty_like(residual)
        delta_ptr = None if delta is None else delta.data_ptr()
        self._add_rms_norm(residual.data_ptr(), delta_ptr, weight.data_ptr(), eps, rows, dim, out.data_ptr())
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up for rows laid out [gate | up]."""
        _check(gate_up, "gate_up", torch.bfloat16, (None, None))
        if not gate_up.is_contiguous() or gate_up.shape[1] % 2:
            raise KernelArgumentError(
                "gate_up: the kernel takes contiguous rows of an even width [gate | up]"
            )
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        out = gate_up.new_empty(rows, width)
        self._silu_mul(gate_up.data_ptr(), rows, width, out.data_ptr())
        return out

    def rope_and_cache(
        self, qkv, num_heads, num_kv_heads, head_dim, cos, sin, slots, k_cache, v_cache, kv_scales=None
    ) -> None:
        """Rotate q and k in place in the fused qkv rows; store k and v at each token's slot (the
        key cache in either layout, see ``packs_keys``; with ``kv_scales`` int8 caches, k packed,
        each vector quantised, see ``kv_scale_cache``)."""
        tokens, width = qkv.shape[0], (num_heads + 2 * num_kv_heads) * head_dim
        _check(qkv, "qkv", torch.bfloat16, (tokens, width))
        for name, table in (("cos", cos), ("sin", sin)):
            _check(table, name, torch.float32, (tokens, head_dim))
        _check(slots, "slots", torch.int64, (tokens,))
        num_slots = min(k_cache.numel(), v_cache.numel()) // (num_kv_heads * head_dim)
        k_block = packed_key_block(k_cache)
        plain = (num_kv_heads, head_dim)
        dtype = torch.bfloat16 if kv_scales is None else torch.int8
        for name, kv, tail in (
            ("k_cache", k_cache, (num_kv_heads, head_dim // 2, k_block, 2) if k_block else plain),
            ("v_cache", v_cache, plain),
        ):
            if kv.dtype != dtype or not kv.is_contiguous() or kv.shape[-len(tail) :] != tail:
                raise KernelArgumentError(
                    f"{name}: the kernel takes a contiguous {dtype} (..., {', '.join(map(str, tail))}) cache"
                )
        if kv_scales is not None:
            if not k_block:
                raise KernelArgumentError("k_cache: int8 caches keep their keys packed (packed_key_cache)")
            if head_dim % 32 or head_dim > 256:  # what the kernel's quantisation buffers hold
                raise KernelArgumentError(f"head_dim {head_dim}: int8 caches take a multiple of 32 up to 256")
            _check(kv_scales, "kv_scales", torch.float32, (k_cache.shape[0], num_kv_heads, 2, k_block))
            if not kv_scales.is_contiguous():
                raise KernelArgumentError("kv_scales: the kernel takes kv_scale_cache's contiguous scales")
        # Every layer of a step gets the same slot tensor: its range (a reduction) is read once.
        if slots is not self._checked_slots:
            if tokens and not 0 <= int(slots.min()) <= int(slots.max()) < num_slots:
                raise KernelArgumentError(f"slots: every slot must lie in the cache's {num_slots}")
            self._checked_slots = slots
        self._rope_and_cache(
            qkv.data_ptr(),
            qkv.shape[0],
            qkv.stride(0),
            num_heads,
            num_kv_heads,
            head_dim,
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            k_block,
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            None if kv_scales is None else kv_scales.data_ptr(),
        )

    def packs_keys(self, head_dim: int, block_size: int) -> bool:
        """Whether a bf16 key cache of heads of ``head_dim`` in blocks of ``block_size`` slots may be
        kept packed for this build's attention (``packed_key_cache``): the AVX-512 bf16 builds,
        head_dim a multiple of 32 up to 256, block_size a multiple of 8. The same builds and shapes
        read int8 caches (``kv_scale_cache``)."""
        return bool(self._packed_keys_take(head_dim, block_size))

    def linear(
        self, x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None,
        fp32_out=False, scale: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """x (rows, K) bf16 with unit column stride, times a weight from ``pack_amx_weight`` (AMX or
        AVX512-BF16, see ``has_linear``) or, with its ``scale``, from ``pack_int8_weight`` (needs
        ``has_int8_linear``); the result in bf16, or float32 with ``fp32_out`` (logits: no rounding,
        no conversion after)."""
        _check(x, "x", torch.bfloat16, (None, None))
        if x.shape[1] % 32:
            raise KernelArgumentError(f"x: the kernels take rows of a multiple of 32 values, got {x.shape[1]}")
        if scale is not None:
            _check(scale, "scale", torch.float32, (None,))
            if scale.numel() < out_features:
                raise KernelArgumentError(f"scale: {scale.numel()} scales for {out_features} columns")
        if packed.numel() * packed.element_size() < x.shape[1] * out_features * (
            1 if scale is not None else 2
        ):
            raise KernelArgumentError(f"packed: too small for a ({out_features}, {x.shape[1]}) weight")
        if bias is not None:  # the kernels read float32 biases
            _check(bias, "bias", torch.float32, (out_features,))
        out = x.new_empty(x.shape[0], out_features, dtype=torch.float32 if fp32_out else torch.bfloat16)
        rows = (x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], packed.data_ptr())
        rest = (
            out_features,
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            out_features,
            int(fp32_out),
        )
        if scale is None:
            self._linear(*rows, *rest)
        elif self._linear_int8(*rows, scale.data_ptr(), *rest) != 0:
            raise MemoryError("the int8 linear kernel could not allocate its scratch memory")
        return out

    def linear_gated(
        self, x: torch.Tensor, packed: torch.Tensor, width: int, scale: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """silu(gate) * up of a gated MLP in one pass: ``packed`` the fused gate_up weight (2 x
        ``width`` outputs, no bias) as ``linear`` takes it; bitwise ``silu_mul(linear(...))``.
        None where the kernel has no gated form (this build, AMX selected, ``width`` not a multiple
        of 16): run the two steps."""
        _check(x, "x", torch.bfloat16, (None, None))
        if x.shape[1] % 32:
            raise KernelArgumentError(f"x: the kernels take rows of a multiple of 32 values, got {x.shape[1]}")
        # pack_int8_weight's bytes with scales, pack_amx_weight's bf16 without
        if packed.dtype != (torch.uint8 if scale is not None else torch.bfloat16):
            raise KernelArgumentError(f"packed: {packed.dtype} weights {'with' if scale is not None else 'without'} scales")
        if scale is None and self._amx_selected:
            return None  # the AMX kernel has no gated form
        if packed.numel() * packed.element_size() < x.shape[1] * 2 * width * (1 if scale is not None else 2):
            raise KernelArgumentError(f"packed: too small for a ({2 * width}, {x.shape[1]}) weight")
        if scale is not None:
            _check(scale, "scale", torch.float32, (None,))
            if scale.numel() < 2 * width:
                raise KernelArgumentError(f"scale: {scale.numel()} scales for {2 * width} columns")
        out = x.new_empty(x.shape[0], width)
        status = self._linear_gated(
            x.data_ptr(), x.stride(0), x.shape[0], x.shape[1], packed.data_ptr(),
            None if scale is None else scale.data_ptr(), width, out.data_ptr(), width,
        )  # fmt: skip
        if status == -3:
            return None
        if status != 0:
            raise MemoryError("the gated linear kernel could not allocate its scratch memory")
        return out

    def use_linear_kernel(self, amx: bool) -> bool:
        """Run ``linear`` (and the one-call step) through the AMX kernel or the AVX512-BF16 one, for
        every caller in the process; False, and nothing changed, when that kernel is not here."""
        if amx and not self.amx:
            return False
        if not self._select_linear(int(amx)):
            self._select_linear(int(self.amx))
            self._amx_selected = self.amx
            return False
        self._amx_selected = amx
        return True

    def decoder_layers(
        self, layers, hidden, shape, eps, scale, cos, sin, slots, tables, ctx_lens, block_size, packed_keys
    ) -> torch.Tensor:
        """Every layer of a bf16 decoder in one call (needs ``has_linear``): ``layers`` a LayerWeights array,
        ``hidden`` the (tokens, hidden_size) residual stream, updated in place; ``shape`` is
        (intermediate, heads, kv_heads, head_dim); ``packed_keys`` whether the layers' key caches
        are packed (``packed_key_cache``). Returns the last layer's MLP output."""
        tokens, hidden_size = hidden.shape
        delta = torch.empty_like(hidden)
        status = self._decoder_layers(
            layers, len(layers), hidden.data_ptr(), delta.data_ptr(), 0, tokens, hidden_size, *shape,
            eps, scale, cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), tables.shape[1],
            ctx_lens.data_ptr(), block_size, int(packed_keys),
        )  # fmt: skip
        if status == -2:
            raise KernelArgumentError(f"packed or int8 key caches: the {self.variant} build cannot read them")
        if status != 0:
            raise MemoryError("the decoder step could not allocate its scratch memory")
        return delta

    def varlen_attention(
        self, qkv: torch.Tensor, heads: int, head_dim: int, bounds: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """An encoder's attention over a packed batch: ``qkv`` (tokens, 3 * heads * head_dim)
        float32 rows [q | k | v], ``bounds`` (items, 2) int64 (start, end) spans that tile the
        rows in order; each token attends to its own span's tokens. Returns (tokens, heads *
        head_dim) float32 (a row is NaN where its scores or values hold a NaN or an infinity)."""
        width = heads * head_dim
        tokens = qkv.shape[0]
        _check(qkv, "qkv", torch.float32, (tokens, 3 * width))
        _check(bounds, "bounds", torch.int64, (None, 2))
        if not bounds.is_contiguous():
            raise KernelArgumentError("bounds: the kernel takes contiguous (start, end) rows")
        # Every row written exactly once: spans that overlapped would race, a gap stay unwritten.
        tiled = (
            bool((bounds[:, 0] < bounds[:, 1]).all())
            and int(bounds[0, 0]) == 0
            and bool((bounds[1:, 0] == bounds[:-1, 1]).all())
            and int(bounds[-1, 1]) == tokens
            if len(bounds)
            else tokens == 0
        )
        if not tiled:
            raise KernelArgumentError(
                f"bounds: non-empty (start, end) spans must tile the {tokens} rows in order"
            )
        if heads <= 0:
            raise KernelArgumentError(f"heads: {heads}, not a count of heads")
        out = qkv.new_empty(tokens, width)
        status = self._varlen_attention(
            qkv.data_ptr(), qkv[:, width:].data_ptr(), qkv[:, 2 * width :].data_ptr(), qkv.stride(0),
            bounds.data_ptr(), len(bounds), heads, head_dim, scale, out.data_ptr(), width,
        )  # fmt: skip
        if status in (-1, -3):
            raise KernelArgumentError(f"head_dim {head_dim}: the {self.variant} build cannot take it")
        if status != 0:
            raise MemoryError("encoder attention could not allocate its scratch memory")
        return out

    def varlen_attention_takes(self, head_dim: int) -> bool:
        """Whether ``varlen_attention`` runs heads of ``head_dim`` in this build (the AVX-512
        builds have it; head_dim a multiple of 16)."""
        return self._has_varlen_attention and head_dim > 0 and head_dim % 16 == 0

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """torch.argmax(logits, dim=-1) for 2-D float32 rows with unit column stride."""
        _check(logits, "logits", torch.float32, (None, None))
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        self._argmax(logits.data_ptr(), logits.stride(0), logits.shape[0], logits.shape[1], out.data_ptr())
        return out


def pack_amx_weight(weight: torch.Tensor) -> torch.Tensor:
    """A (N, K) bf16 weight in the tile order amx_linear.c and bf16_linear.c read: N padded to a multiple of 32,
    then [N/32][K/32][2][16][16][2] (pairs of 16-column blocks, VNNI pairs of K). K % 32 == 0."""
    n, k = weight.shape
    padded = -(-n // 32) * 32
    if padded != n:
        weight = torch.cat([weight, weight.new_zeros(padded - n, k)])
    return weight.reshape(padded // 32, 2, 16, k // 32, 16, 2).permute(0, 3, 1, 4, 2, 5).contiguous()


def packed_key_cache(
    num_blocks: int, num_kv_heads: int, head_dim: int, block_size: int, device=None, dtype=torch.bfloat16
) -> torch.Tensor:
    """An uninitialised bf16 (or int8) key cache of ``num_blocks`` blocks in the packed layout the
    bf16 attention reads (paged_decode.c, packed_keys_take): per block and kv head, head_dim / 2
    rows of block_size (dim 2j, dim 2j + 1) pairs, so a block's keys need no transposing at each
    step. Slot s lies at block s // block_size, offset s % block_size, as in the plain layout."""
    return torch.empty(num_blocks, num_kv_heads, head_dim // 2, block_size, 2, dtype=dtype, device=device)


def kv_scale_cache(num_blocks: int, num_kv_heads: int, block_size: int, device=None) -> torch.Tensor:
    """The uninitialised float32 scales of an int8 KV cache (int8 keys from ``packed_key_cache``,
    int8 values (slots, kv_heads, head_dim)): per block and kv head, its slots' key scales then their
    value scales. Each cached vector x is stored as round(x / s) with s = max |x| / 127
    (rope_and_cache writes them; paged_decode.c states the layout)."""
    return torch.empty(num_blocks, num_kv_heads, 2, block_size, dtype=torch.float32, device=device)


def quantise_vectors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., head_dim) as an int8 KV cache stores each vector, in torch (rope_and_cache does it
    natively; tests and benchmarks build caches with this): int8 round(x / s) with s = max |x| / 127
    in float32 (0, and zeros, where s would fall below the smallest normal float: its reciprocal
    would overflow), and s; bitwise what the kernel stores."""
    x = x.float()
    s = x.abs().amax(-1) / 127
    s = torch.where(s >= torch.finfo(torch.float32).tiny, s, 0.0)
    q = torch.where(s[..., None] > 0, torch.round(x / s[..., None]), 0.0).clamp(-127, 127)
    return q.to(torch.int8), s


def packed_key_block(k_cache: torch.Tensor) -> int:
    """The block size of a key cache from ``packed_key_cache``; 0 for a plain (slots, kv_heads,
    head_dim) cache."""
    return k_cache.shape[3] if k_cache.dim() == 5 else 0


def pack_int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (N, K) weight quantised per output column to int8 (symmetric: scale = max |w| / 127, every
    column's largest weight kept exactly up to rounding) for linear_int8 (bf16_linear.c): stored
    plus 128 as unsigned bytes (what VPDPBUSD multiplies), N padded to a multiple of 32 with zero
    weights, laid out [N/32][K/4][2][16][4] (for each 4 inputs, the two 16-column blocks' 64-byte
    lines); with the float32 scales, zero-padded to the packed N. K % 32 == 0."""
    n, k = weight.shape
    if k % 32:
        raise ValueError(f"int8 weights need K a multiple of 32, got {k}")
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    padded_n = -(-n // 32) * 32
    stored = torch.full((padded_n, k), 128, dtype=torch.uint8)
    stored[:n] = (torch.round(w / scale[:, None]).clamp(-127, 127) + 128).to(torch.uint8)
    packed = stored.reshape(padded_n // 32, 2, 16, k // 4, 4).permute(0, 3, 1, 2, 4).contiguous()
    padded = torch.zeros(padded_n)
    padded[:n] = scale
    return packed, padded


@cache
def native_ops() -> NativeOps | None:
    """The best kernel library built with the package that loads on this CPU; None when none
    does, after one WARNING saying why: the runner then uses its torch paths."""
    runnable = variants.runnable()
    failures = []
    for variant in runnable:
        if prebuilt_library(variant) is None:
            continue
        try:
            ops = load_variant(variant)
        except (OSError, AttributeError) as exc:  # not a library for this system, or an older build
            failures.append(f"the {variant.name} build did not load ({exc})")
            continue
        if failures:
            why = "; ".join(failures)
            log.warning(
                "native kernels: %s; running the %s build instead (%s)", why, variant.name, _HOW_TO_BUILD
            )
        else:
            names = ", ".join(v.name for v in runnable)
            log.info("native kernels: the %s build (this CPU runs %s)", variant.name, names)
        return ops
    names = ", ".join(v.name for v in runnable)
    why = "; ".join(failures) or f"the package holds no kernel library this CPU can run (it runs {names})"
    log.warning("running without the native kernels, on the torch paths (slower): %s; %s", why, _HOW_TO_BUILD)
    return None


def prebuilt_library(variant: variants.Variant) -> Path | None:
    """Where the package's build of ``variant`` is, if it was built."""
    return next((p for s in EXTENSION_SUFFIXES if (p := _HERE / (variant.stem + s)).is_file()), None)


def load_variant(variant: variants.Variant) -> NativeOps:
    """The package's build of ``variant`` (the caller makes sure this CPU can execute it)."""
    library = prebuilt_library(variant)
    if library is None:
        raise FileNotFoundError(f"the {variant.name} kernels were not built with this package")
    return NativeOps(ctypes.CDLL(str(library)), variant.name, library)


def _bind(function, *argtypes, restype=ctypes.c_int):
    function.argtypes = list(argtypes)
    function.restype = restype
    return function
