"""LRP rules as modified gradients.

Convention (the "gradient x input" form of LRP): what flows backwards through the network is a
gradient ``g``, and the relevance of any tensor ``a`` is ``R = a * g``. A rule attached to a layer
with input ``x`` and output ``z`` receives ``g_out`` (so ``R_out = z * g_out``) and returns
``g_in`` with ``x * g_in`` equal to the rule's ``R_in``. Layers without a rule pass the plain
gradient: for ReLU, max-pooling, reshapes, residual additions (a sum splits relevance in proportion
to each summand, the LRP-0 rule) and matrix products with a constant factor this *is* relevance
propagation, which is why skip connections and attention need no special code here.

Rules whose relevance does not factor through the input (z-beta box, flat, w-square) are meant
for the first layer; their ``R_in`` is returned exactly when that layer's input is the model input
and divided by the stabilised input otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from whatmatters.core.errors import MethodError

Tensor = torch.Tensor


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign(z)``, with sign(0) taken as +1 (so the result is never 0 for eps > 0)."""
    return torch.where(z >= 0, z + eps, z - eps)


def damped(z: Tensor, eps: float) -> Tensor:
    """``z / stabilize(z, eps)``, computed as ``|z| / (|z| + eps)``: the same floats (a sign flip is exact)
    in three passes over ``z`` instead of six."""
    a = z.abs()
    return a.div_(a + eps)


def _affine(module: nn.Module) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """The layer's forward as a function of (input, weight, bias)."""
    if isinstance(module, nn.Linear):
        return F.linear
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return module._conv_forward  # type: ignore[union-attr]
    raise MethodError(
        f"this LRP rule needs a Linear or Conv layer, not {type(module).__name__}; give that layer another rule"
    )


def _params(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    w = module.weight.detach()
    b = module.bias.detach() if getattr(module, "bias", None) is not None else None
    return w, b


def _vjp(fn: Callable[[Tensor], Tensor], x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """``(fn(x), J_fn(x)^T s)`` for a function linear in ``x``."""
    with torch.enable_grad():
        xx = x.detach().requires_grad_(True)
        z = fn(xx)
        (g,) = torch.autograd.grad(z, xx, s)
    return z.detach(), g


def _jt(fn: Callable[[Tensor], Tensor], like: Tensor, s: Tensor) -> Tensor:
    """``J^T s`` for a linear function ``fn`` (its Jacobian does not depend on the point)."""
    return _vjp(fn, torch.zeros_like(like), s)[1]


def _lin_t(module: nn.Module, w: Tensor, x: Tensor, s: Tensor) -> Tensor:
    """``W^T s`` for the layer with weight ``w`` (no forward pass where torch has the transposed op)."""
    if isinstance(module, nn.Linear):
        return s @ w
    if (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and 1 <= w.ndim - 2 <= 3
    ):
        # the input-gradient half of the convolution's backward; given the real input (not an expanded
        # stand-in, as torch.nn.grad.conv2d_input passes) oneDNN keeps its fast path (~15 % faster)
        return torch.ops.aten.convolution_backward(
            s, x, w, None, module.stride, module.padding, module.dilation, False, [0] * (w.ndim - 2),
            module.groups, (True, False, False),
        )[0]  # fmt: skip
    f = _affine(module)
    return _jt(lambda t: f(t, w, None), x, s)


def _plain(module: nn.Module) -> bool:
    """A Linear or (not transposed) Conv layer: its output ``z`` is ``f(x, weight, bias)`` of :func:`_affine`."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed)


def _from_output(module: nn.Module, signed: bool) -> bool:
    """Whether a rule may read ``W x`` off the layer's output instead of a pass of its own: an input without
    negative entries (not ``signed``), and a torch Linear / Conv itself (a subclass may compute its output
    otherwise) whose weights stack (one transposed pass for two weights)."""
    return not signed and type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) and _stackable(module)


def _signed(x: Tensor) -> bool:
    """Whether a layer input has negative entries (a ReLU network's hidden inputs have none)."""
    return x.numel() > 0 and bool(torch.amin(x) < 0)  # one reduction, no boolean tensor (10x faster on CPU)


def _stackable(module: nn.Module) -> bool:
    """Whether weights can be stacked along input or output channels (one layer pass for several weights):
    a Linear, or a Conv without groups."""
    return getattr(module, "groups", 1) == 1


def _by_sign(x: Tensor, at_nonneg: Tensor, at_neg: Tensor | None) -> Tensor:
    """The gradient of the ``x >= 0`` terms where ``x >= 0``, of the ``x < 0`` terms elsewhere.

    Where ``x == 0`` the relevance ``x * g`` is 0 whichever is passed on; the ``x >= 0`` one is, so that an
    input without negative entries needs only that one (``at_neg`` None).
    """
    return at_nonneg if at_neg is None else torch.where(x >= 0, at_nonneg, at_neg)


def _ch(module: nn.Module) -> int:
    """The channel dimension of the layer's inputs and outputs: the last for a Linear (also on token
    sequences), 1 for a Conv. Weights stack along their own dimension 0 (outputs) or 1 (inputs)."""
    return -1 if isinstance(module, nn.Linear) else 1


def _pos(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(max=0)


@dataclass
class Rule:
    """Base class: ``backward(module, x, z, g_out) -> g_in``; ``raw`` rules return ``R_in`` instead."""

    raw = False  # True: backward returns relevance, not a gradient

    def backward(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, module: nn.Module, x: Tensor, z: Tensor) -> Tensor | None:
        """Optional replacement of the layer's output (same value, different graph); None keeps it."""
        return None

    def output_factor(self, module: nn.Module, z: Tensor) -> Tensor | None:
        """``f`` when the rule's ``g_in`` is the layer's own gradient of ``f * g_out`` (then the layer's autograd
        backward applies the rule to the scaled gradient: no pass of ours); None: :meth:`backward` runs."""
        return None


@dataclass
class Epsilon(Rule):
    """LRP-epsilon: ``R_in = x * W^T (R_out / (z + eps sign z))``; ``epsilon=0`` is LRP-0."""

    epsilon: float = 1e-6

    def backward(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        w, _ = _params(module)
        return _lin_t(module, w, x, damped(z, self.epsilon).mul_(g))

    def output_factor(self, module: nn.Module, z: Tensor) -> Tensor | None:
        # W^T (g z / (z + eps sign z)) is the layer's input gradient of the scaled output gradient
        return damped(z.detach(), self.epsilon) if _plain(module) else None


@dataclass
class Norm(Rule):
    """Epsilon rule for parameter-free linear layers (average pooling): the layer's own gradient, renormalised."""

    stabilizer: float = 1e-6

    def backward(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        _, gx = _vjp(module.forward, x, damped(z, self.stabilizer).mul_(g))  # forward: no hooks
        return gx

    def output_factor(self, module: nn.Module, z: Tensor) -> Tensor | None:
        return damped(z.detach(), self.stabilizer)  # the layer's own gradient, of the renormalised output gradient


@dataclass
class AlphaBeta(Rule):
    """LRP-alpha-beta (``alpha - beta = 1``): positive and negative contributions weighted separately.

    Positive part ``W+ x+ + W- x- + b+``, negative part ``W- x+ + W+ x- + b-``; ``alpha=1, beta=0``
    is the z+ rule.
    """

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1) > 1e-12:
            raise MethodError(f"alpha-beta needs alpha, beta >= 0 and alpha - beta = 1; got {self.alpha}, {self.beta}")

    def backward(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        w, b = _params(module)
        r = z * g
        signed = _signed(x)
        if self.beta != 0 and _from_output(module, signed):
            return self._unsigned(module, x, z, r, w, _pos(b))
        f, ch = _affine(module), _ch(module)
        wp, wn = w.clamp(min=0), w.clamp(max=0)

        def part(w_pos: Tensor, w_neg: Tensor, bias: Tensor | None, up: bool) -> tuple[Tensor, Tensor | None]:
            """Gradients through ``w_pos x+ + w_neg x- + bias``: at ``x >= 0`` and (signed inputs) at ``x < 0``."""

            def share(zz: Tensor) -> Tensor:  # the up part has no negative terms: its stabilizer is + eps
                den = zz.add_(self.stabilizer) if up else stabilize(zz, self.stabilizer)
                return torch.div(r, den, out=den)

            if not signed:  # x- = 0: one layer pass and one transposed pass
                return _lin_t(module, w_pos, x, share(f(x, w_pos, bias))), None
            if _stackable(module):  # [x+, x-] as one input of twice the channels: one pass each way
                both, w_both = torch.cat([x.clamp(min=0), x.clamp(max=0)], ch), torch.cat([w_pos, w_neg], 1)
                return _lin_t(module, w_both, both, share(f(both, w_both, bias))).chunk(2, ch)
            s = share(f(x.clamp(min=0), w_pos, bias) + f(x.clamp(max=0), w_neg, None))
            return _lin_t(module, w_pos, x, s), _lin_t(module, w_neg, x, s)

        up, up_neg = part(wp, wn, _pos(b), True)
        if self.beta == 0:
            return _by_sign(x, up, up_neg)
        down, down_neg = part(wn, wp, _neg(b), False)
        neg = None if up_neg is None else self.alpha * up_neg - self.beta * down_neg
        return _by_sign(x, self.alpha * up - self.beta * down, neg)

    def _unsigned(self, module: nn.Module, x: Tensor, z: Tensor, r: Tensor, w: Tensor, bp: Tensor | None) -> Tensor:
        """``x >= 0``: the negative part is ``z`` minus the positive one, and ``W-^T s = W^T s - W+^T s``, so one
        layer pass (``W+ x + b+``) and one transposed pass of ``[W+; W]`` (twice the outputs)."""
        wp = w.clamp(min=0)
        zp = _affine(module)(x, wp, bp)
        s_down = r / stabilize(z - zp, self.stabilizer)
        s_up = r.div_(zp.add_(self.stabilizer))  # the up part has no negative terms: its stabilizer is + eps
        s = torch.cat([torch.add(s_up.mul_(self.alpha), s_down, alpha=self.beta), s_down.mul_(-self.beta)], _ch(module))
        return _lin_t(module, torch.cat([wp, w]), x, s)


def ZPlus(stabilizer: float = 1e-6) -> AlphaBeta:
    """The z+ rule: alpha-beta with ``alpha=1, beta=0``."""
    return AlphaBeta(1.0, 0.0, stabilizer)


@dataclass
class Gamma(Rule):
    """LRP-gamma (generalised to signed inputs): positive contributions boosted by ``gamma``.

    Where ``z > 0`` relevance follows ``(W + gamma W+) x+ + (W + gamma W-) x- + b + gamma b+``; where
    ``z < 0`` it follows ``(W + gamma W-) x+ + (W + gamma W+) x- + b + gamma b-``.
    """

    gamma: float = 0.25
    stabilizer: float = 1e-6

    def backward(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        w, b = _params(module)
        f = _affine(module)
        r = z * g
        signed = _signed(x)
        if _from_output(module, signed):  # z = W+ x + b+ + W- x + b-: only W+ x + b+ needs a pass
            return self._unsigned(module, x, z, r, w, f(x, w.clamp(min=0), _pos(b)))
        wu, wd = w + self.gamma * w.clamp(min=0), w + self.gamma * w.clamp(max=0)
        bu = None if b is None else b + self.gamma * b.clamp(min=0)
        bd = None if b is None else b + self.gamma * b.clamp(max=0)
        ch = _ch(module)
        if _stackable(module):  # both parts as one layer of twice the outputs: one pass each way
            inp, w_up, w_down = x, wu, wd
            if signed:  # and [x+, x-] as one input of twice the channels
                inp = torch.cat([x.clamp(min=0), x.clamp(max=0)], ch)
                w_up, w_down = torch.cat([wu, wd], 1), torch.cat([wd, wu], 1)
            w2 = torch.cat([w_up, w_down])
            zu, zd = f(inp, w2, None if b is None else torch.cat([bu, bd])).chunk(2, ch)
            up = r * (z > 0) / stabilize(zu, self.stabilizer)
            down = r * (z < 0) / stabilize(zd, self.stabilizer)
            g_in = _lin_t(module, w2, inp, torch.cat([up, down], ch))
            return _by_sign(x, *g_in.chunk(2, ch)) if signed else g_in
        if not signed:  # x- = 0: the x- terms vanish
            up = r * (z > 0) / stabilize(f(x, wu, bu), self.stabilizer)
            down = r * (z < 0) / stabilize(f(x, wd, bd), self.stabilizer)
            return _lin_t(module, wu, x, up) + _lin_t(module, wd, x, down)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        up = r * (z > 0) / stabilize(f(xp, wu, bu) + f(xn, wd, None), self.stabilizer)
        down = r * (z < 0) / stabilize(f(xp, wd, bd) + f(xn, wu, None), self.stabilizer)
        g_pos = _lin_t(module, wu, x, up) + _lin_t(module, wd, x, down)
        g_neg = _lin_t(module, wd, x, up) + _lin_t(module, wu, x, down)
        return _by_sign(x, g_pos, g_neg)

    def _unsigned(self, module: nn.Module, x: Tensor, z: Tensor, r: Tensor, w: Tensor, zp: Tensor) -> Tensor:
        """``x >= 0``, ``zp = W+ x + b+``: where ``z > 0`` the up part ``z + gamma zp`` (positive), elsewhere the
        down part ``z + gamma (z - zp)`` (negative, so its stabiliser is ``- eps``) share ``r``; then
        ``wu^T up + wd^T down = W^T (up + (1 + gamma) down) + gamma W+^T (up - down)``: one transposed pass of
        ``[W; W+]``. (The parts' supports are disjoint: one quotient ``q`` serves both.)"""
        gamma, eps = self.gamma, self.stabilizer
        up = z > 0
        a = torch.add(z, zp, alpha=gamma)
        den = torch.where(up, a.add_(eps), torch.sub(z, zp, alpha=gamma / (1 + gamma)).mul_(1 + gamma).sub_(eps))
        q = r.div_(den)
        s = torch.cat([torch.where(up, q, q * (1 + gamma)), torch.where(up, q, -q).mul_(gamma)], _ch(module))
        return _lin_t(module, torch.cat([w, w.clamp(min=0)]), x, s)


@dataclass
class ZBox(Rule):
    """z-beta (bounded input): ``R = x g(W) - l g(W+) - h g(W-)`` over ``z = W x - W+ l - W- h``.

    ``low`` / ``high`` are the smallest and largest possible input values (floats or tensors that
    broadcast against one sample, e.g. ``(C, 1, 1)`` per channel). For the first layer.
    """

    low: float | Tensor = 0.0
    high: float | Tensor = 1.0
    stabilizer: float = 1e-6
    raw = True

    def backward(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        w, _ = _params(module)
        f = _affine(module)
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        low = torch.as_tensor(self.low, dtype=x.dtype, device=x.device).expand_as(x[0]).expand_as(x)
        high = torch.as_tensor(self.high, dtype=x.dtype, device=x.device).expand_as(x[0]).expand_as(x)
        if _stackable(module):  # [x, l, h] as one input of three times the channels: one pass each way
            ch = _ch(module)
            inp, w3 = torch.cat([x, low, high], ch), torch.cat([w, -wp, -wn], 1)
            s = z * g / stabilize(f(inp, w3, None), self.stabilizer)
            g_x, g_low, g_high = _lin_t(module, w3, inp, s).chunk(3, ch)
            return x * g_x + low * g_low + high * g_high
        zz = f(x, w, None) - f(low, wp, None) - f(high, wn, None)
        s = z * g / stabilize(zz, self.stabilizer)
        return x * _lin_t(module, w, x, s) - low * _lin_t(module, wp, x, s) - high * _lin_t(module, wn, x, s)


@dataclass
class Flat(Rule):
    """Flat rule: relevance spread uniformly over each output's receptive field (first layer)."""

    stabilizer: float = 1e-6
    raw = True

    def backward(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        w, _ = _params(module)
        f = _affine(module)
        wo = torch.ones_like(w)
        s = z * g / stabilize(f(torch.ones_like(x), wo, None), self.stabilizer)
        return _lin_t(module, wo, x, s)


@dataclass
class WSquare(Rule):
    """w-square rule: relevance spread in proportion to ``W**2`` (first layer, unbounded inputs)."""

    stabilizer: float = 1e-6
    raw = True

    def backward(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        w, b = _params(module)
        f = _affine(module)
        w2 = w * w
        zz = f(torch.ones_like(x), w2, None if b is None else b * b)
        return _lin_t(module, w2, x, z * g / stabilize(zz, self.stabilizer))


@dataclass
class Pass(Rule):
    """Identity rule for element-wise layers (activations, unmerged BatchNorm): ``R_in = R_out``.

    For ReLU this is the plain gradient; for others ``g_in = z / x * g_out`` (0 where ``x = 0``).
    """

    def backward(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        ratio = torch.where(x != 0, z / torch.where(x != 0, x, 1), 0)
        return ratio * g


@dataclass
class Gradient(Rule):
    """The plain gradient (no rule): right for ReLU, max-pooling, reshapes, dropout, additions."""

    def backward(self, module: nn.Module, x: Tensor, z: Tensor, g: Tensor) -> Tensor:
        raise AssertionError("Gradient is not attached as a hook")


@dataclass
class LayerNormRule(Rule):
    """Conservative LayerNorm (Ali et al. 2022): the standard deviation is a constant in the backward pass.

    The output is recomputed as ``(x - mean(x)) / std.detach() * w + b``; relevance then follows the
    centred input linearly, and the bias ``b`` (and the mean) absorb the rest, as in LRP-0.
    """

    def forward(self, module: nn.Module, x: Tensor, z: Tensor) -> Tensor:
        shape = module.normalized_shape  # type: ignore[attr-defined]
        dims = tuple(range(-len(shape), 0))
        centred = x - x.mean(dims, keepdim=True)
        std = (centred.pow(2).mean(dims, keepdim=True) + module.eps).sqrt().detach()  # type: ignore[attr-defined]
        out = centred / std
        if getattr(module, "weight", None) is not None:
            out = out * module.weight.detach()
        if getattr(module, "bias", None) is not None:
            out = out + module.bias.detach()
        return z.detach() + (out - out.detach())


@dataclass
class Constant(Rule):
    """The layer's output is a constant in the backward pass (attention softmax: the AH-rule)."""

    def forward(self, module: nn.Module, x: Tensor, z: Tensor) -> Tensor:
        return z.detach()


RULES: dict[str, Callable[..., Rule]] = {
    "epsilon": Epsilon,
    "zero": lambda: Epsilon(0.0),
    "gamma": Gamma,
    "alpha1_beta0": ZPlus,
    "zplus": ZPlus,
    "alpha2_beta1": lambda stabilizer=1e-6: AlphaBeta(2.0, 1.0, stabilizer),
    "alpha_beta": AlphaBeta,
    "zbox": ZBox,
    "flat": Flat,
    "wsquare": WSquare,
    "norm": Norm,
    "pass": Pass,
    "gradient": Gradient,
    "layernorm": LayerNormRule,
    "constant": Constant,
}
