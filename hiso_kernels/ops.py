"""Public in-place zeroth-order operations (``docs/kernels.md``), run through ``torch.ops.hiso.*`` custom ops.

All operations work on a list of parameter tensors that together form the flat vector x: element ``k`` of
``params[i]`` has the global index ``offset + numel(params[:i]) + k``, and direction values depend only on
(seed, direction index, global index, distribution). Directions are regenerated inside the kernels and never stored.

Coefficients, alpha, beta and weight decay are rounded once to fp32, the precision of the kernels. H is fp32 and
either one tensor per parameter or one flat tensor over all of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _validate as v
from . import spec
from ._program import Program, Round, build_program, program_from_tensors
from .backends import select_backend
from .spec import CurvatureRule, Distribution

DEFAULT_BETA = 0.95
DEFAULT_H_MIN = 1e-8


def _run(
    params: list[torch.Tensor],
    hessian: list[torch.Tensor],
    program: Program,
    *,
    offset: int,
    backend: str | None,
    check_hessian: bool,
) -> None:
    """Validate the tensors, then run one program. Nothing is written if any check fails."""
    params = v.tensor_list("params", params)
    hessian = v.tensor_list("hessian", hessian, allow_empty=True)
    device = v.check_params(params)
    h_views = v.check_hessian(hessian, params)
    offsets = v.global_offsets(params, offset)
    if program.rule != CurvatureRule.NONE and h_views is None:
        raise ValueError(f"curvature rule {program.rule.name.lower()!r} updates H, so a hessian is required")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    impl = select_backend(device, backend)
    if h_views is not None and check_hessian:
        v.check_hessian_values(hessian)  # the caller's tensors: a flat H is checked as one tensor
    if all(p.numel() == 0 for p in params):
        return
    impl.apply(params, h_views, offsets, program)


# ---------------------------------------------------------------- registered custom ops (the torch.ops.hiso namespace)
@torch.library.custom_op("hiso::apply_program_", mutates_args=("params", "hessian"))
def _apply_program_op(
    params: list[torch.Tensor],
    hessian: list[torch.Tensor],
    seeds: torch.Tensor,
    dirs: torch.Tensor,
    round_start: torch.Tensor,
    round_rseed: torch.Tensor,
    coef_x: torch.Tensor,
    coef_h: torch.Tensor,
    round_wd: torch.Tensor,
    round_flags: torch.Tensor,
    offset: int,
    distribution: int,
    curvature_rule: int,
    beta: float,
    one_minus_beta: float,
    h_min: float,
    backend: str | None,
    check_hessian: bool,
) -> None:
    """Run a program (the packed rounds of ``hiso_kernels._program``, as CPU tensors) in place on ``params`` and
    ``hessian``. The public functions build the program; every operation goes through this op."""
    program = program_from_tensors((seeds, dirs, round_start, round_rseed, coef_x, coef_h, round_wd, round_flags),
                                   distribution, curvature_rule, beta, one_minus_beta, h_min)
    _run(params, hessian, program, offset=offset, backend=backend, check_hessian=check_hessian)


@_apply_program_op.register_fake
def _(params, hessian, seeds, dirs, round_start, round_rseed, coef_x, coef_h, round_wd, round_flags, offset,
      distribution, curvature_rule, beta, one_minus_beta, h_min, backend, check_hessian):
    return None


@torch.library.custom_op("hiso::perturb_", mutates_args=("params",))
def _perturb_op(
    params: list[torch.Tensor],
    hessian: list[torch.Tensor],
    seed: int,
    alpha: float,
    direction: int,
    offset: int,
    distribution: str,
    stochastic_rounding: bool,
    backend: str | None,
    check_hessian: bool,
) -> None:
    """x <- x + alpha u(seed, direction) / sqrt(H) with scalar arguments (a convenience for callers of torch.ops;
    ``hiso_kernels.perturb_`` builds its program and calls ``apply_program_``)."""
    program = _perturb_program(seed, alpha, direction, distribution, stochastic_rounding, params)
    _run(params, hessian, program, offset=offset, backend=backend, check_hessian=check_hessian)


@_perturb_op.register_fake
def _(params, hessian, seed, alpha, direction, offset, distribution, stochastic_rounding, backend, check_hessian):
    return None


@torch.library.custom_op("hiso::directions", mutates_args=())
def _directions_op(
    seed: int, numel: int, direction: int, offset: int, distribution: str, device: torch.device, backend: str | None
) -> torch.Tensor:
    seed = v.check_int("seed", seed, 0, spec.SEED_MAX)
    direction = v.check_int("direction", direction, 0, spec.DIRECTION_MAX)
    numel = v.check_int("numel", numel, 0, spec.INDEX_LIMIT)
    offset = v.check_int("offset", offset, 0, spec.INDEX_LIMIT - numel)
    dist = Distribution.parse(distribution)
    impl = select_backend(torch.device(device), backend)
    return impl.directions(seed, direction, offset, numel, dist, torch.device(device))


@_directions_op.register_fake
def _(seed, numel, direction, offset, distribution, device, backend):
    return torch.empty(numel, dtype=torch.float32, device=device)


@torch.compiler.disable
def _perturb_program(seed, alpha, direction, distribution, stochastic_rounding, params) -> Program:
    seed = v.check_int("seed", seed, 0, spec.SEED_MAX)
    direction = v.check_int("direction", direction, 0, spec.DIRECTION_MAX)
    alpha = v.check_f32("alpha", alpha)
    return build_program([Round([seed], [direction], [-alpha])], distribution=distribution,
                         rule=CurvatureRule.NONE, stochastic_rounding=_flag("stochastic_rounding",
                                                                            stochastic_rounding),
                         pin_memory=_on_gpu(params))


@torch.compiler.disable
def _replay_program(rounds, distribution, rule, beta, h_min, stochastic_rounding, params) -> Program:
    return build_program(rounds, distribution=distribution, rule=rule, beta=beta, h_min=h_min,
                         stochastic_rounding=_flag("stochastic_rounding", stochastic_rounding),
                         pin_memory=_on_gpu(params))


def _on_gpu(params) -> bool:
    first = params[0] if isinstance(params, (list, tuple)) and params else params
    return isinstance(first, torch.Tensor) and first.device.type == "cuda"


def _call_op(params, hessian, program: Program, offset: int, backend, check_hessian) -> None:
    torch.ops.hiso.apply_program_(
        params, hessian, *program.tensors(), offset, int(program.distribution), int(program.rule), program.beta,
        program.one_minus_beta, program.h_min, backend, check_hessian,
    )


# ---------------------------------------------------------------- public Python API
def _seq(name: str, value, n: int | None = None) -> list:
    """A scalar broadcast to length n, or a sequence (tensors and arrays accepted)."""
    if isinstance(value, torch.Tensor) or (hasattr(value, "tolist") and not isinstance(value, (int, float))):
        value = value.tolist()
    if isinstance(value, (list, tuple, range)):
        return list(value)
    if n is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value] * n
    raise TypeError(f"{name} must be a sequence" + (" or a scalar" if n is not None else ""))


def _hessian_arg(hessian, params: list[torch.Tensor]) -> list[torch.Tensor]:
    if hessian is None:
        return []
    hessian = [hessian] if isinstance(hessian, torch.Tensor) else list(hessian)
    # The op checks H's device too, but an H on the meta device would route the whole call to the op's fake kernel
    # and make it a silent no-op: reject it (and any other device) before the dispatcher sees it.
    device = params[0].device
    for i, h in enumerate(hessian):
        if isinstance(h, torch.Tensor) and h.device != device:
            raise ValueError(f"hessian[{i}] is on {h.device} but params are on {device}: H lives beside the params")
    return hessian


def _params_arg(params) -> list[torch.Tensor]:
    params = v.tensor_list("params", params)
    # Checked here as well as in the op: with a tensor on the meta device in the list the dispatcher would route the
    # call to the op's fake kernel and nothing would be checked.
    device = params[0].device
    for i, t in enumerate(params):
        if t.device != device:
            raise ValueError(f"params[{i}] is on {t.device} but params[0] is on {device}: use one device per call")
    return params


def _offset_arg(offset) -> int:
    return v.check_int("offset", offset, 0, spec.INDEX_LIMIT)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _dist_arg(distribution) -> str:
    return Distribution.parse(distribution).name.lower()


def _renamed_rule(curvature_rule, rule, default):
    """``rule=`` was renamed ``curvature_rule=`` (0.2); the old keyword still works, with a DeprecationWarning."""
    if rule is None:
        return curvature_rule
    import warnings

    warnings.warn("hiso_kernels: the keyword rule= is deprecated; use curvature_rule=", DeprecationWarning,
                  stacklevel=3)
    if curvature_rule is not None and curvature_rule != default:
        raise TypeError("pass curvature_rule= or its deprecated name rule=, not both")
    return rule


def global_offsets(params, offset: int = 0) -> list[int]:
    """Global index of each tensor's first element when ``params`` form one flat vector starting at ``offset``.

    Element k of ``params[i]`` has the global index ``global_offsets(params, offset)[i] + k``; directions depend on
    this index only, so a shard that passes its own offset draws the directions of the whole model.
    """
    return v.global_offsets(v.tensor_list("params", params), offset)


def perturb_(
    params,
    seed: int,
    alpha: float,
    *,
    direction: int = 0,
    hessian=None,
    offset: int = 0,
    distribution: str = "gaussian",
    stochastic_rounding: bool = False,
    backend: str | None = None,
    check_hessian: bool = True,
) -> None:
    """x <- x + alpha * u(seed, direction) / sqrt(H), in place, in one pass (H optional, read only).

    MeZO's perturb / restore (arXiv 2305.17333): ``perturb_(p, s, mu)``, ``perturb_(p, s, -2 * mu)``,
    ``perturb_(p, s, mu)``.
    """
    params = _params_arg(params)
    program = _perturb_program(seed, alpha, direction, distribution, stochastic_rounding, params)
    _call_op(params, _hessian_arg(hessian, params), program, _offset_arg(offset), backend,
             _flag("check_hessian", check_hessian))


def zo_update_(
    params,
    seeds,
    directions,
    coefficients,
    *,
    hessian=None,
    offset: int = 0,
    weight_decay: float = 0.0,
    distribution: str = "gaussian",
    stochastic_rounding: bool = False,
    backend: str | None = None,
    check_hessian: bool = True,
) -> None:
    """x <- x - (sum_i a_i u(seed_i, p_i) / sqrt(H) + weight_decay * x), all terms in one pass (H read only).

    A ZO-SGD step with P directions from one seed: ``zo_update_(p, seed, range(P), [lr * c_p / P for c_p in c])``.
    ``seeds`` or ``directions`` may be a single integer, broadcast to the length of ``coefficients``.
    """
    coefficients = _seq("coefficients", coefficients)
    n = len(coefficients)
    rnd = Round(_seq("seeds", seeds, n), _seq("directions", directions, n), coefficients, weight_decay=weight_decay)
    replay_(
        params, [rnd], hessian=hessian, curvature_rule="none", offset=offset, distribution=distribution,
        stochastic_rounding=stochastic_rounding, backend=backend, check_hessian=check_hessian,
    )


def hiso_round_(
    params,
    hessian,
    seeds,
    directions,
    coefficients,
    curvature_coefficients,
    *,
    beta: float = DEFAULT_BETA,
    h_min: float = DEFAULT_H_MIN,
    curvature_rule: str = "gsq",
    offset: int = 0,
    weight_decay: float = 0.0,
    distribution: str = "gaussian",
    stochastic_rounding: bool = False,
    backend: str | None = None,
    check_hessian: bool = True,
    rule: str | None = None,
) -> None:
    """One HiSo round in one pass: the x update with the old H, then the H update (``docs/kernels.md``; HiSo,
    arXiv 2506.02370, with the authors' rule "gsq").

    x <- x - (sum_i a_i u_i / sqrt(H) + weight_decay x);   H <- max(beta H + (1 - beta) v, h_min) with
    v = (sum_i b_i u_i / sqrt(H))^2 for rule "gsq" (HiSo: b_i = c_i / P of the round's last step) or
    v = H sum_i b_i (u_i^2 - 1) for rule "stein" (b_i = second differences / P).
    ``rule=`` is the deprecated name of ``curvature_rule=``.
    """
    curvature_rule = _renamed_rule(curvature_rule, rule, default="gsq")
    if hessian is None:
        raise ValueError("hiso_round_ needs hessian (fp32, > 0; start it at ones)")
    coefficients = _seq("coefficients", coefficients)
    n = len(coefficients)
    rnd = Round(
        _seq("seeds", seeds, n), _seq("directions", directions, n), coefficients,
        _seq("curvature_coefficients", curvature_coefficients), weight_decay=weight_decay,
    )
    replay_(
        params, [rnd], hessian=hessian, curvature_rule=curvature_rule, beta=beta, h_min=h_min, offset=offset,
        distribution=distribution, stochastic_rounding=stochastic_rounding, backend=backend,
        check_hessian=check_hessian,
    )


def replay_(
    params,
    rounds: Sequence[Round],
    *,
    hessian=None,
    curvature_rule: str | None = None,
    beta: float = DEFAULT_BETA,
    h_min: float = DEFAULT_H_MIN,
    offset: int = 0,
    distribution: str = "gaussian",
    stochastic_rounding: bool = False,
    backend: str | None = None,
    check_hessian: bool = True,
    rule: str | None = None,
) -> None:
    """Apply many rounds in one pass over memory; equal, bit for bit, to applying them one by one.

    ``curvature_rule`` defaults to "gsq" when ``hessian`` is given (H is updated after each round) and "none"
    otherwise. ``rule=`` is the deprecated name of ``curvature_rule=``.
    """
    curvature_rule = _renamed_rule(curvature_rule, rule, default=None)
    if isinstance(rounds, Round):
        rounds = [rounds]
    if isinstance(rounds, (str, bytes)) or not hasattr(rounds, "__iter__"):
        raise TypeError(f"rounds must be a sequence of hiso_kernels.Round, got {type(rounds).__name__}")
    rounds = list(rounds)
    if not rounds:
        raise ValueError("rounds is empty")
    if curvature_rule is None:
        curvature_rule = "gsq" if hessian is not None else "none"
    params = _params_arg(params)
    program = _replay_program(rounds, distribution, CurvatureRule.parse(curvature_rule), beta, h_min,
                              stochastic_rounding, params)
    _call_op(params, _hessian_arg(hessian, params), program, _offset_arg(offset), backend,
             _flag("check_hessian", check_hessian))


def directions(
    seed: int,
    numel: int,
    *,
    direction: int = 0,
    offset: int = 0,
    distribution: str = "gaussian",
    device: torch.device | str = "cpu",
    backend: str | None = None,
) -> torch.Tensor:
    """Materialise u(seed, direction) for global indices [offset, offset + numel) as fp32 (tests, reference use)."""
    seed = v.check_int("seed", seed, 0, spec.SEED_MAX)
    direction = v.check_int("direction", direction, 0, spec.DIRECTION_MAX)
    numel = v.check_int("numel", numel, 0, spec.INDEX_LIMIT)
    return torch.ops.hiso.directions(seed, numel, direction, _offset_arg(offset), _dist_arg(distribution),
                                     torch.device(device), backend)
