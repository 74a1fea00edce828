"""Recurrent (constant-state) form of causal long convolutions: every filter replaced by its modal fit.

A causal mixer's filter is a tap sequence k[c, t] that depends on the offset t alone. Its modal form of
order S (:mod:`m2convert.layers.modal`: a float64 Hankel-SVD realization plus least-squares residues
over a horizon of L taps, default 8192) keeps the first tap exactly and writes the others as S damped
complex exponentials:

    k[c, 0] = h0[c]                                       exact
    k[c, t] = Re(sum_s r[c, s] * lam[c, s] ** (t - 1))    t >= 1, |lam| < 1

so the convolution is carried by S complex numbers per channel (:mod:`m2convert.layers.decode`):
``y_t = Re(sum_s r * state) + (h0 + D) * w_t``, then ``state = lam * state + w_t``.
:class:`RecurrentFilter` holds (lam, r, h0) and generates the taps for any length, so the full forward
(the FFT path) and the recurrent steps compute the same convolution.

Example:
    >>> config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2)
    >>> converted = m2.convert(transformers.GPT2LMHeadModel(config).eval(), filter_order=16)
    >>> report = m2.to_recurrent(converted, state_size=8, horizon=1024)   # a recurrent copy in report.model
    >>> [layer.status for layer in report.layers], report.layers[0].filter_error < 1e-2
    (['recurrent'], True)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, check_int
from .gemv import lay_out_for_decode
from .modal import STATE_SIZE, ModalFit, fit_modal, min_horizon, modal_taps
from .sequence import M2SequenceMixer

HORIZON = 8192            # taps fitted: the longest context served at the fit's accuracy
CAUSAL_MODES = ("causal", "causal-monarch")
# Called with every model to_recurrent returns (the plan records the recurrent form: m2convert.passes.plan).
RECURRENT_MODEL_HOOKS: list = []


def _tap_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64


class RecurrentFilter(nn.Module):
    """A causal filter in modal form: taps [h0, Re(sum_s r_s lam_s^(t-1))...] for any length.

    Parameters ``lam`` and ``residue`` (C, S, 2) hold the complex poles and residues as (real, imag)
    pairs (so ``.to(dtype)`` and state dicts treat them as real tensors), ``h0`` (C,) the first tap; the
    buffer ``fit_error`` (C,) is each channel's relative L2 fit error over ``horizon`` taps. It answers
    the :class:`~m2convert.layers.filters.ImplicitFilter` calls the mixer makes (``forward(n)``,
    ``trunk(n)``, ``taps(trunk, start, stop)``), computing taps in float64 (float32 on MPS).

    Shapes: forward(n) -> (1, C, n); modes(dtype) -> (lam (C, S), residue (C, S), h0 (C,)).

    Example:
        >>> filt = RecurrentFilter.from_taps(torch.randn(4, 300) * 0.9 ** torch.arange(300.0), state_size=8)
        >>> filt(5).shape, filt.state_size
        (torch.Size([1, 4, 5]), 8)
    """

    heads = 1

    def __init__(self, fit: ModalFit, horizon: int, dtype=None, device=None):
        super().__init__()
        factory = {"dtype": dtype or torch.float32, "device": device}
        self.channels, self.state_size = fit.lam.shape
        self.horizon = int(horizon)
        self.lam = nn.Parameter(torch.view_as_real(fit.lam).to(**factory))       # (C, S, 2)
        self.residue = nn.Parameter(torch.view_as_real(fit.residue).to(**factory))
        self.h0 = nn.Parameter(fit.h0.to(**factory))                               # (C,)
        self.register_buffer("fit_error", fit.error.to(**factory))                 # (C,)
        self.total_error: float | None = None      # relative L2 of all channels' taps (set by fits, layouts)

    @classmethod
    def from_taps(cls, taps: torch.Tensor, state_size: int = STATE_SIZE) -> RecurrentFilter:
        """Fit (C, L) taps (horizon L); parameters in the taps' dtype and device."""
        fit = fit_modal(taps, state_size)
        filt = cls(fit, taps.shape[-1], dtype=taps.dtype, device=taps.device)
        filt.total_error = fit.total_error
        return filt

    @classmethod
    def empty(cls, channels: int, state_size: int, horizon: int, dtype=None, device=None) -> RecurrentFilter:
        """All-zero filter of these sizes: the structure a saved recurrent filter's tensors load into."""
        zeros = torch.zeros(channels, state_size, dtype=torch.complex128)
        fit = ModalFit(zeros, zeros, zeros.real[:, 0], zeros.real[:, 0], zeros.real[:, 0])
        return cls(fit, horizon, dtype=dtype, device=device)

    def modes(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lam, residue) (C, S) complex and h0 (C,) real, in ``dtype`` (real; default the parameters')."""
        real = dtype or self.h0.dtype
        lam, residue = (torch.view_as_complex(p.to(real).contiguous()) for p in (self.lam, self.residue))
        return lam, residue, self.h0.to(real)

    def trunk(self, n: int) -> torch.Tensor:
        """Stands in for the filter MLP's trunk: an empty (n, 0) tensor that carries the length."""
        return self.h0.new_empty(n, 0)

    def taps(self, trunk: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(1, stop - start, n) taps of channels [start, stop), n = trunk.shape[0]."""
        lam, residue, h0 = (t[start:stop] for t in self.modes(_tap_dtype(self.h0)))
        return modal_taps(lam, residue, h0, trunk.shape[0]).to(self.h0.dtype)[None]

    def forward(self, n: int) -> torch.Tensor:
        return self.taps(self.trunk(n))                                             # (1, C, n)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, state_size={self.state_size}, horizon={self.horizon}"


def state_bytes(mixer: M2SequenceMixer, state_size: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one sequence's recurrent decoding state of ``mixer``: modal states of its filters (S complex
    per channel each) and the short conv's last kernel - 1 inputs (3D each), in real ``dtype``, and the ring
    of keys and values of its window attention where it has one.

    Example:
        >>> state_bytes(M2SequenceMixer(32, mode="causal"), 16)       # 2 * 32 * 16 * 8 + 96 * 2 * 4
        8960
    """
    size = torch.tensor([], dtype=dtype).element_size()
    filters = 2 if mixer.residual_filter is not None else 1
    return (filters * mixer.d_inner * state_size * 2 * size + 3 * mixer.d_inner * (mixer.short_kernel - 1) * size
            + _ring_bytes(mixer))


def _ring_bytes(mixer: M2SequenceMixer) -> int:
    branch = getattr(mixer, "window_attention", None)
    return 0 if branch is None else branch.state_bytes()


def window_state_bytes(mixer: M2SequenceMixer, dtype: torch.dtype = torch.float32) -> int | None:
    """Bytes of one sequence's decoding state of a local mixer (filters limited to ``window`` offsets):
    its last ``window`` gated (and residual) inputs and the short conv's last inputs; None without a window.

    Example:
        >>> window_state_bytes(M2SequenceMixer(32, mode="causal", filter_window=6))   # 2 * 32 * 6 * 4 + 96 * 2 * 4
        2304
    """
    window = getattr(mixer.filter, "window", None)
    if window is None:
        return None
    size = torch.tensor([], dtype=dtype).element_size()
    filters = 2 if mixer.residual_filter is not None else 1
    return (filters * mixer.d_inner * window * size + 3 * mixer.d_inner * (mixer.short_kernel - 1) * size
            + _ring_bytes(mixer))


@dataclass
class LayerFit:
    """One mixer of :func:`to_recurrent`: status "recurrent" (fit errors: relative L2 of all channels'
    taps, and the worst channel's), "window" (a local mixer kept exact: its window of past inputs is the
    smaller state) or "skip" with its reason; state bytes per sequence."""

    name: str
    status: str
    reason: str = ""
    filter_error: float | None = None
    residual_error: float | None = None
    max_channel_error: float | None = None
    state_bytes: int = 0


@dataclass
class RecurrentReport:
    """What :func:`to_recurrent` did: the recurrent ``model`` and one :class:`LayerFit` per mixer."""

    model: nn.Module
    state_size: int
    horizon: int
    layers: list[LayerFit] = field(default_factory=list)

    @property
    def state_bytes(self) -> int:
        """Decoding state of one sequence over all recurrent mixers (the mixers' dtype)."""
        return sum(layer.state_bytes for layer in self.layers)

    def __str__(self) -> str:
        lines = [f"state_size={self.state_size}, horizon={self.horizon}, state {self.state_bytes} bytes per sequence",
                 f"{'mixer':<48} {'status':<10} {'filter':>9} {'residual':>9} {'worst ch':>9}"]
        for f in self.layers:
            errs = [f"{e:9.2e}" if e is not None else f"{'-':>9}"
                    for e in (f.filter_error, f.residual_error, f.max_channel_error)]
            lines.append(f"{f.name or '(mixer)':<48} {f.status:<10} {' '.join(errs)} {f.reason}".rstrip())
        return "\n".join(lines)


def _make_recurrent(name: str, mixer: M2SequenceMixer, state_size: int, horizon: int) -> LayerFit:
    errors, worst = {}, 0.0
    for role in ("filter", "residual_filter"):
        filt = getattr(mixer, role)
        if filt is None:
            continue
        dtype = mixer.D.dtype
        with torch.no_grad():
            # A half-precision filter makes its taps from a float32 copy of its (small) MLP: taps rounded
            # to bf16 would put that rounding into the fit.
            exact = copy.deepcopy(filt).float() if dtype in (torch.float16, torch.bfloat16) else filt
            taps = exact(horizon)[0]                                                # (H, L)
        fit = fit_modal(taps, state_size)
        setattr(mixer, role, RecurrentFilter(fit, horizon, dtype=dtype, device=taps.device))
        getattr(mixer, role).total_error = fit.total_error
        errors[role], worst = fit.total_error, max(worst, float(fit.error.max()))
    mixer._spectrum_cache = None
    return LayerFit(name, "recurrent", filter_error=errors["filter"], residual_error=errors.get("residual_filter"),
                    max_channel_error=worst, state_bytes=state_bytes(mixer, state_size, mixer.D.dtype))


def to_recurrent(model: nn.Module, state_size: int = STATE_SIZE, horizon: int = HORIZON, *,
                 inplace: bool = False) -> RecurrentReport:
    """Replace the filters of every causal M2 mixer in ``model`` by fitted modal forms of ``state_size``.

    ``model`` is a converted model or one :class:`M2SequenceMixer`; a deep copy is changed unless
    ``inplace`` (as in ``m2.convert``), and returned as ``report.model``. The full forward then uses the
    fitted taps, and ``generate()`` decodes with a fixed-size state (O(1) per token in the context); the
    converted weight matrices are stored for one-token products (:mod:`m2convert.layers.gemv`).
    Bidirectional mixers are listed as skipped, with the reason. A local mixer (filters limited to a
    window) keeps its exact filters where its window of past inputs is no larger than the modal state
    (status "window"). Fitting again refits the current taps.

    Raises:
        ConfigError: ``state_size`` < 1, ``horizon`` < 8 S + 41, or no causal mixer in ``model``.

    Example:
        >>> report = m2.to_recurrent(M2SequenceMixer(16, mode="causal"), state_size=4, horizon=512)
        >>> type(report.model.filter).__name__, report.layers[0].state_bytes
        ('RecurrentFilter', 1408)
    """
    check_int("state_size", state_size, low=1)
    check_int("horizon", horizon, low=min_horizon(state_size))
    mixers = [(n, m) for n, m in model.named_modules() if isinstance(m, M2SequenceMixer)]
    if not any(m.mode in CAUSAL_MODES for _, m in mixers):
        found = sorted({repr(m.mode) for _, m in mixers}) or ["none"]
        raise ConfigError(f"to_recurrent needs causal M2 mixers (mode 'causal' or 'causal-monarch'); "
                          f"{type(model).__name__} has mixers of mode {', '.join(found)}: convert a decoder "
                          "with m2.convert first")
    target = model if inplace else copy.deepcopy(model)
    report = RecurrentReport(target, state_size, horizon)
    for name, mixer in tqdm([(n, m) for n, m in target.named_modules() if isinstance(m, M2SequenceMixer)],
                            desc="m2convert: fitting recurrent filters", disable=None, leave=False):
        if mixer.mode not in CAUSAL_MODES:
            report.layers.append(LayerFit(name, "skip", reason=f"mode={mixer.mode!r}: a bidirectional "
                                          "filter sees future tokens and has no recurrent form"))
            continue
        window = getattr(mixer.filter, "window", None)
        kept = window_state_bytes(mixer, mixer.D.dtype)
        if window is not None and kept <= state_bytes(mixer, state_size, mixer.D.dtype):
            report.layers.append(LayerFit(name, "window", state_bytes=kept, reason=(
                f"a local mixer: decodes exactly from its last {window} inputs, no larger than the modal state")))
            continue
        report.layers.append(_make_recurrent(name, mixer, state_size, horizon))
    lay_out_for_decode(target)
    for hook in RECURRENT_MODEL_HOOKS:
        hook(target)
    return report


def recurrent_layout(model: nn.Module) -> dict[str, dict]:
    """``{mixer name: {"state_size": S, "horizon": L}}`` of the recurrent mixers in ``model``: with the
    weights, what restores its structure (JSON-ready; see :func:`restore_recurrent_layout`).

    Example:
        >>> recurrent_layout(to_recurrent(M2SequenceMixer(16, mode="causal"), 4, 512).model)
        {'': {'state_size': 4, 'horizon': 512}}
    """
    return {name: {"state_size": m.filter.state_size, "horizon": m.filter.horizon}
            for name, m in model.named_modules()
            if isinstance(m, M2SequenceMixer) and isinstance(m.filter, RecurrentFilter)}


def restore_recurrent_layout(model: nn.Module, layout: dict[str, dict]) -> nn.Module:
    """Give the mixers named in ``layout`` (from :func:`recurrent_layout`) empty recurrent filters of the
    recorded sizes, in place, so that the recurrent model's state dict loads into ``model`` (and stores
    the weights for decoding as :func:`to_recurrent` does, so ``load_state_dict`` gives equal outputs).

    Raises:
        ConfigError: a name is not a causal M2 mixer of ``model``.

    Example:
        >>> rec = to_recurrent(M2SequenceMixer(16, mode="causal"), 4, 512).model
        >>> fresh = restore_recurrent_layout(M2SequenceMixer(16, mode="causal"), recurrent_layout(rec))
        >>> _ = fresh.load_state_dict(rec.state_dict())
        >>> x = torch.randn(1, 3, 16)
        >>> torch.equal(fresh(x), rec(x))
        True
    """
    modules = dict(model.named_modules())
    for name, sizes in layout.items():
        mixer = modules.get(name)
        if not isinstance(mixer, M2SequenceMixer) or mixer.mode not in CAUSAL_MODES:
            raise ConfigError(f"recurrent layout names {name!r}, which is not a causal M2 mixer of "
                              f"{type(model).__name__} ({type(mixer).__name__}); was it saved from another model?")
        for role in ("filter", "residual_filter"):
            if getattr(mixer, role) is not None:
                setattr(mixer, role, RecurrentFilter.empty(mixer.d_inner, sizes["state_size"], sizes["horizon"],
                                                           dtype=mixer.D.dtype, device=mixer.D.device))
                getattr(mixer, role).total_error = sizes.get(_ERROR_KEYS[role])   # recorded by recurrent_fits
        mixer._spectrum_cache = None
    lay_out_for_decode(model)
    return model


_ERROR_KEYS = {"filter": "filter_error", "residual_filter": "residual_error"}


def recurrent_fits(model: nn.Module) -> dict[str, dict]:
    """:func:`recurrent_layout` plus each mixer's fit errors (``filter_error``, ``residual_error``: relative
    L2 of all channels' taps, None where unknown or absent; ``max_channel_error``: the worst channel's).
    JSON-ready; :func:`restore_recurrent_layout` takes it too and keeps the errors.

    Example:
        >>> fits = recurrent_fits(to_recurrent(M2SequenceMixer(16, mode="causal"), 4, 512).model)
        >>> sorted(fits[""]), fits[""]["filter_error"] < 1e-2
        (['filter_error', 'horizon', 'max_channel_error', 'residual_error', 'state_size'], True)
    """
    out = {}
    modules = dict(model.named_modules())
    for name, sizes in recurrent_layout(model).items():
        filters = {role: getattr(modules[name], role) for role in _ERROR_KEYS}
        errors = {key: None if filters[role] is None else filters[role].total_error
                  for role, key in _ERROR_KEYS.items()}
        worst = max((float(f.fit_error.max()) for f in filters.values() if f is not None and f.fit_error.numel()),
                    default=0.0)
        out[name] = {**sizes, **errors, "max_channel_error": worst}
    return out
